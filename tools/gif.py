"""An animated GIF of a trained policy playing one episode, for the README.

    python tools/gif.py ppo_discrete runs/RUN/checkpoint.pt lander.gif [--every 2] [--scale 0.5]

Plays the checkpoint's deterministic policy (render_mode="rgb_array") in the first episode of the
run's own evaluation (its evaluation seed, so the return printed is that episode's), keeps every
--every-th frame scaled by --scale, and writes them with Pillow as a looping GIF at the env's frame
rate / --every.
"""

import argparse
import importlib
import os
import sys
import zipfile

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.loading import load_agent, write_whole  # noqa: E402
COLORS = 32  # palette size of each frame: the envs draw few colours, and the GIF stays small


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=["ppo_discrete", "ppo_continuous"], help="the script that trained it")
    parser.add_argument("checkpoint", help="a run's checkpoint.pt or best.pt")
    parser.add_argument("out", help="the .gif to write")
    parser.add_argument("--every", type=int, default=2, help="keep every K-th frame")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the frames")
    opts = parser.parse_args(argv)
    script = importlib.import_module(opts.script)
    try:
        return animate(script, opts)
    except script.RunError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return e.args[1] if len(e.args) > 1 else 2


def animate(script, opts) -> int:
    if opts.every < 1 or not opts.scale > 0:
        raise script.RunError("--every must be 1 or more and --scale positive")
    out = opts.out
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise script.RunError(f"{out} is a folder or its folder does not exist: give the path of the .gif to write")
    if os.path.isfile(out) and zipfile.is_zipfile(out):  # torch checkpoints are zips, GIFs are not
        raise script.RunError(f"{out} is a checkpoint: writing over it would destroy it; give another path")
    args, agent = load_agent(script, opts.checkpoint)

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # frames need no window; SDL would probe displays and warn
    env = gym.make(args.env_id, render_mode="rgb_array")
    space = env.action_space
    obs, _ = env.reset(seed=args.seed + 1_000_000)  # the scripts' evaluation seed
    frames, done, step, episode_return = [], False, 0, 0.0
    while not done:
        if step % opts.every == 0:
            frame = Image.fromarray(env.render())
            size = (max(1, round(frame.width * opts.scale)), max(1, round(frame.height * opts.scale)))
            frames.append(frame.resize(size, Image.LANCZOS).quantize(COLORS))
        with torch.no_grad():
            action = agent.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
        if isinstance(space, gym.spaces.Box):  # what the script's ClipAction wrapper does
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        done, step, episode_return = terminated or truncated, step + 1, episode_return + float(reward)
    fps = env.metadata.get("render_fps", 50) / opts.every
    env.close()
    # GIF times are in hundredths of a second, and browsers slow any under 2 hundredths to 10.
    durations = [max(2, round(100 / fps)) * 10] * len(frames)
    durations[-1] *= 10  # rest on the last frame before the loop starts again
    write_whole(script, out, lambda path: frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                                                          duration=durations, loop=0, optimize=True))
    # Pillow merges a frame identical to the one before into it (a longer duration), so the file may hold fewer.
    print(f"{out}: {len(frames)} frames at {fps:g} fps, {os.path.getsize(out) / 1e6:.2f} MB; "
          f"episode return {episode_return:.1f} in {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

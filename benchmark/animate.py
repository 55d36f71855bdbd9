"""An animated GIF of a trained policy flying one episode, for the README (issue 12).

    python benchmark/animate.py runs/RUN/checkpoint.pt benchmark/results/lander_discrete.gif

Plays the checkpoint's deterministic policy in its env (render_mode="rgb_array"), keeps every
--every-th frame scaled by --scale, and writes them with Pillow (installed with moviepy) as a
looping GIF at the env's frame rate / --every. The episode is the first of the script's own
evaluation (its evaluation seed), so the return printed is that episode's.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="the .gif to write")
    parser.add_argument("--every", type=int, default=2, help="keep every N-th frame")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the frames")
    parser.add_argument("--colors", type=int, default=32, help="palette size of each frame")
    opts = parser.parse_args()

    script = __import__(torch.load(opts.checkpoint, weights_only=True)["script"])
    data = script.load_checkpoint(opts.checkpoint)
    args = script.Args(**data["args"])
    agent = script.agent_from_checkpoint(data)
    env = script.make_env(args.env_id, render_mode="rgb_array")()
    obs, _ = env.reset(seed=script.eval_seed(args))
    frames, done, step = [], False, 0
    while not done:
        if step % opts.every == 0:
            frame = Image.fromarray(env.render())
            size = (round(frame.width * opts.scale), round(frame.height * opts.scale))
            frames.append(frame.resize(size, Image.LANCZOS).quantize(opts.colors))
        with torch.no_grad():
            action = agent.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
        obs, _, terminated, truncated, info = env.step(action)
        done, step = terminated or truncated, step + 1
    frames += [frames[-1]] * 10  # rest on the last frame before the loop starts again
    fps = env.metadata.get("render_fps", 50) / opts.every
    frames[0].save(opts.out, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                   optimize=True)
    print(f"{opts.out}: {len(frames)} frames, {os.path.getsize(opts.out) / 1e6:.2f} MB; "
          f"episode return {float(info['episode']['r']):.1f} in {step} steps")


if __name__ == "__main__":
    main()

"""An animated GIF of a trained policy flying one episode, for the README (issue 12).

    python benchmark/animate.py runs/RUN/checkpoint.pt benchmark/results/lander_discrete.gif

Plays the checkpoint's deterministic policy in its env (render_mode="rgb_array"), keeps every
--every-th frame scaled by --scale, and writes them with Pillow (installed with moviepy) as a
looping GIF at the env's frame rate / --every. The episode is the first of the script's own
evaluation (its evaluation seed), so the return printed is that episode's.

A checkpoint cannot choose code to run: it is read by whichever of the two scripts wrote it
(no other module is imported), and its env id is used only if it is a registered Gymnasium id;
otherwise give --env-id yourself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = ("ppo_discrete", "ppo_continuous")  # the only modules a checkpoint may name


def load(path: str):
    """(script module, checkpoint) of whichever script wrote path; SystemExit with one line if neither did."""
    errors = []
    for name in SCRIPTS:
        script = importlib.import_module(name)
        try:
            return script, script.load_checkpoint(path)
        except script.CheckpointError as e:
            errors.append(str(e))
    # Damage is worth more than "not a checkpoint of X": the script that wrote it said what is wrong.
    damage = [e for e in errors if "is not a checkpoint of" not in e]
    fail(damage[0] if damage else f"{path} is not a checkpoint of {' or '.join(f'{n}.py' for n in SCRIPTS)}")


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="the .gif to write")
    parser.add_argument("--every", type=int, default=2, help="keep every N-th frame")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the frames")
    parser.add_argument("--colors", type=int, default=32, help="palette size of each frame")
    parser.add_argument("--env-id", help="play in this env instead of the checkpoint's (needed when the "
                                         "checkpoint's id is not a registered Gymnasium id)")
    opts = parser.parse_args(argv)
    if opts.every < 1 or not opts.scale > 0 or not 2 <= opts.colors <= 256:
        fail("--every must be 1 or more, --scale positive and --colors between 2 and 256")

    import gymnasium as gym
    import torch
    from PIL import Image

    script, data = load(opts.checkpoint)
    known = {f.name for f in fields(script.Args)}
    args = script.Args(**{k: v for k, v in data["args"].items() if k in known})
    if opts.env_id:
        args.env_id = opts.env_id
    elif args.env_id not in gym.registry:  # gym.make("module:Env") would import that module
        fail(f"the checkpoint names env {args.env_id!r}, which is not a registered Gymnasium id: pass "
             f"--env-id {args.env_id} yourself if you trust the file")
    if error := script.check_env(args.env_id):
        fail(error)
    if script.env_shapes(args.env_id) != (data["obs_dim"], data[script.ACTION_SIZE]):
        fail(f"the checkpoint was trained for {data['obs_dim']} observations and {data[script.ACTION_SIZE]} "
             f"actions, which {args.env_id} does not have: give the env it was trained on")
    agent = script.agent_from_checkpoint(data)
    env = script.make_env(args.env_id, render_mode="rgb_array")()
    obs, _ = env.reset(seed=script.eval_seed(args))
    frames, done, step = [], False, 0
    while not done:
        if step % opts.every == 0:
            frame = Image.fromarray(env.render())
            size = (max(1, round(frame.width * opts.scale)), max(1, round(frame.height * opts.scale)))
            frames.append(frame.resize(size, Image.LANCZOS).quantize(opts.colors))
        with torch.no_grad():
            action = agent.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
        obs, _, terminated, truncated, info = env.step(action)
        done, step = terminated or truncated, step + 1
    frames += [frames[-1]] * 10  # rest on the last frame before the loop starts again
    fps = env.metadata.get("render_fps", 50) / opts.every
    tmp = f"{opts.out}.{os.getpid()}.tmp"  # a failed write leaves the old GIF, if any, and no part of a new one
    try:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=0, optimize=True)
        os.replace(tmp, opts.out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"cannot write {opts.out} ({e.strerror or e})", code=1)
    print(f"{opts.out}: {len(frames)} frames, {os.path.getsize(opts.out) / 1e6:.2f} MB; "
          f"episode return {float(info['episode']['r']):.1f} in {step} steps")


if __name__ == "__main__":
    main()

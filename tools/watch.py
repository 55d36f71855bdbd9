"""Watch a trained policy play in a window: the deterministic policy, one env at its own frame rate.

    python tools/watch.py ppo_discrete runs/RUN/checkpoint.pt [--episodes 5] [--seed S]

Episode i starts from seed S + i; the default S is the run's evaluation seed, so episode 1 is the
first episode of its evaluation. Without a display, record videos with the script instead:
`python ppo_discrete.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video`.
"""

import argparse
import importlib
import os
import sys

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.loading import load_agent  # noqa: E402


def check_display(script: str, checkpoint: str):
    """None, or why no window can open (with a dead DISPLAY, SDL draws offscreen, unseen, not fails)."""
    chosen = os.environ.get("SDL_VIDEODRIVER", "")  # e.g. "dummy": no window, asked for
    where = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    driver = None
    if not sys.platform.startswith("linux") or chosen or where:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame
        try:
            pygame.display.init()
            driver = pygame.display.get_driver()
        except pygame.error:
            pass
        pygame.display.quit()
        if driver == chosen or driver not in (None, "offscreen", "dummy"):
            return None
    return (f"{f'no display answers at {where}' if where else 'no display is set'}: record videos with "
            f"`python {script}.py --eval-checkpoint {checkpoint} --capture-video` instead")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=["ppo_discrete", "ppo_continuous"], help="the script that trained it")
    parser.add_argument("checkpoint", help="a run's checkpoint.pt or best.pt")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, help="seed of the first episode (default: the run's evaluation seed)")
    opts = parser.parse_args(argv)
    script = importlib.import_module(opts.script)
    try:
        if opts.episodes < 1:
            raise script.RunError("--episodes must be 1 or more")
        if error := check_display(opts.script, opts.checkpoint):
            raise script.RunError(error)
        args, agent = load_agent(script, opts.checkpoint)
    except script.RunError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return e.args[1] if len(e.args) > 1 else 2
    env = gym.make(args.env_id, render_mode="human")
    space = env.action_space
    seed = args.seed + 1_000_000 if opts.seed is None else opts.seed  # the scripts' evaluation seed
    try:
        for episode in range(opts.episodes):
            obs, _ = env.reset(seed=seed + episode)
            done, episode_return = False, 0.0
            while not done:
                with torch.no_grad():
                    action = agent.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
                if isinstance(space, gym.spaces.Box):  # what the script's ClipAction wrapper does
                    action = np.clip(action, space.low, space.high)
                obs, reward, terminated, truncated, _ = env.step(action)
                done, episode_return = terminated or truncated, episode_return + float(reward)
            print(f"episode {episode + 1}: return {episode_return:.1f}", flush=True)
    except KeyboardInterrupt:  # closing the show early is normal
        return 130
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

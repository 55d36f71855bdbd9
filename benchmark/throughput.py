"""Training speed against the raw speed of the environment, for both scripts (issues 4 and 13).

    python benchmark/throughput.py                  # both scripts, 3 repetitions, 200k steps each
    python benchmark/throughput.py --steps 500000 --reps 5 --scripts ppo_discrete
    python benchmark/throughput.py --compile        # also --compile: steady speed, compile time, payback

For each script, at fixed hyperparameters, in one process with one torch thread:
  raw    the vector env the script builds (same env, same num_envs, same autoreset mode),
         stepped with random actions: the ceiling for any trainer on that vector env
  train  the script's own train() for --steps env steps: rollout, GAE, update, logging,
         checkpoints; no evaluation, no video, interpreter start-up and imports excluded
and the split of training time into the phases of an iteration (collecting the rollout, env
steps included; building the batch; the update), from the timings train() returns. Each figure is the median over the repetitions, raw and train
alternating so that both see the same machine state. With --compile, each repetition also trains
with --compile twice in the same process: the first run compiles from nothing (no code compiled
earlier in the process, Inductor's on-disk caches off), the second reuses the compiled code (its
steady speed); the difference of their wall times is the compile time, and
compile time / (eager seconds per step - compiled seconds per step) is the run length in steps
from which compiling pays back. Writes a markdown table (--out).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.utils.tensorboard  # noqa: F401  (imported here so that train() does not time the import)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_continuous  # noqa: E402
import ppo_discrete  # noqa: E402

# CleanRL's ppo.py defaults (4 envs x 128 steps, 4 epochs x 4 minibatches, 2.5e-4, gamma 0.99,
# lambda 0.95, value clipping) on the default env; the continuous script at its own defaults.
FLAGS = {
    "ppo_discrete": ["--num-envs", "4", "--num-steps", "128", "--num-minibatches", "4", "--update-epochs", "4",
                     "--learning-rate", "2.5e-4", "--gamma", "0.99", "--gae-lambda", "0.95", "--clip-vloss"],
    "ppo_continuous": [],
}


def raw_env_sps(script, args, steps: int) -> float:
    envs = script.make_vector_env([script.make_env(args.env_id) for _ in range(args.num_envs)])
    envs.reset(seed=args.seed)
    envs.action_space.seed(args.seed)
    n = steps // args.num_envs
    start = time.perf_counter()
    for _ in range(n):
        envs.step(envs.action_space.sample())
    elapsed = time.perf_counter() - start
    envs.close()
    return n * args.num_envs / elapsed


def train_sps(script, args) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        agent, optimizer = script.make_agent_and_optimizer(args)
        progress, timings = script.train(args, run_dir, agent, optimizer)
        elapsed = time.perf_counter() - start
    return progress.global_step / elapsed, timings


def cold_compile() -> None:
    """Make the next torch.compile start from nothing, as a user's first run does: no code
    compiled earlier in this process, and no graphs from Inductor's on-disk caches."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200_000, help="env steps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--scripts", nargs="+", default=["ppo_discrete", "ppo_continuous"])
    parser.add_argument("--compile", action="store_true", help="also measure --compile")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput.md"))
    opts = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for name in opts.scripts:
        script = {"ppo_discrete": ppo_discrete, "ppo_continuous": ppo_continuous}[name]
        flags = [*FLAGS[name], "--total-timesteps", str(opts.steps), "--print-every", "1e9"]
        import tyro

        args = tyro.cli(script.Args, args=flags)
        raws, trains, splits, compiled = [], [], [], []
        for rep in range(opts.reps):
            raws.append(raw_env_sps(script, args, opts.steps))
            sps, timings = train_sps(script, args)
            trains.append(sps)
            total = sum(timings.values())
            splits.append({k: v / total for k, v in timings.items()})
            print(f"{name} rep {rep + 1}: raw {raws[-1]:,.0f} steps/s, train {sps:,.0f} steps/s", flush=True)
            if opts.compile:
                cargs = replace(args, compile=True)
                cold_compile()
                cold, _ = train_sps(script, cargs)
                warm, _ = train_sps(script, cargs)
                compile_s = opts.steps / cold - opts.steps / warm
                compiled.append((warm, compile_s, compile_s / max(1 / sps - 1 / warm, 1e-12)))
                print(f"  compiled: {warm:,.0f} steps/s once compiled, compiling took {compile_s:.1f} s", flush=True)
        raw, train = statistics.median(raws), statistics.median(trains)
        split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
        comp = tuple(statistics.median(c[i] for c in compiled) for i in range(3)) if compiled else None
        rows.append((name, args, raw, train, split, flags, comp))

    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: "
             f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}, torch {torch.__version__}, one torch thread; "
             f"{opts.steps:,} env steps per measurement, median of {opts.reps}.",
             f"Command: `python benchmark/throughput.py --steps {opts.steps} --reps {opts.reps}`", "",
             "| script | env x num_envs | batch / minibatch x epochs | raw env steps/s | training steps/s "
             "| training / raw | rollout | batch | update |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, args, raw, train, split, flags, comp in rows:
        lines.append(f"| {name}.py | {args.env_id} x {args.num_envs} | {args.batch_size} / {args.minibatch_size} x "
                     f"{args.update_epochs} | {raw:,.0f} | {train:,.0f} | {100 * train / raw:.0f}% | "
                     + " | ".join(f"{100 * split[k]:.0f}%" for k in ("rollout", "batch", "update")) + " |")
    if opts.compile:
        lines += ["", "With `--compile` (the minibatch forward and loss compiled by torch.compile):", "",
                  "| script | eager steps/s | compiled steps/s, once compiled | compile time | pays back after |",
                  "|---|---:|---:|---:|---:|"]
        for name, args, raw, train, split, flags, (warm, compile_s, payback) in rows:
            verdict = f"{payback:,.0f} steps" if warm > train else "never (not faster)"
            lines.append(f"| {name}.py | {train:,.0f} | {warm:,.0f} | {compile_s:.1f} s | {verdict} |")
    lines += ["", "Flags: " + "; ".join(f"{name}.py `{' '.join(FLAGS[name]) or '(defaults)'}`" for name, *_ in rows)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    with open(opts.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

"""Training speed against the raw speed of the environment, for both scripts (issues 4 and 13).

    python benchmark/throughput.py                  # 3 configurations, 3 repetitions, 200k steps each
    python benchmark/throughput.py --steps 500000 --reps 5 --configs ppo_discrete-cleanrl
    python benchmark/throughput.py --compile        # eager and compiled side by side

For each configuration (a script at fixed hyperparameters), in one process with one torch thread:
  raw    the vector env the script builds (same env, same num_envs, same autoreset mode),
         stepped with random actions: the ceiling for any trainer on that vector env
  train  the script's own train() for --steps env steps, eagerly (--no-compile): rollout, GAE,
         update; no logging, checkpoints, evaluation or video (the harness's), interpreter
         start-up and imports excluded; and the split of its time into the phases of an
         iteration (the rollout, env steps included; building the batch; the update).
Each figure is the median over the repetitions, raw and train alternating so that both see the
same machine state. With --compile, each repetition also trains with --compile after clearing
every compiled graph and turning Inductor's on-disk caches off, as a user's first run on a
machine (the compile time reported is the longest of the repetitions): "steady" speeds count from the end of the first iteration (which holds the compiling)
to the end, for eager and compiled alike; the compile time is how much longer the compiled
run's first iteration took than the eager one's; and compile time / (eager seconds per step -
compiled seconds per step) is the run length in env steps from which compiling pays back.
Writes a markdown table (--out).
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

# Configuration name -> (script, flags). CleanRL's ppo.py defaults (4 envs x 128 steps, 4 epochs x
# 4 minibatches, 2.5e-4, gamma 0.99, lambda 0.95, value clipping) on the default env, then each
# script at its own defaults.
CONFIGS = {
    "ppo_discrete-cleanrl": ("ppo_discrete", ["--num-envs", "4", "--num-steps", "128", "--num-minibatches", "4",
                                              "--update-epochs", "4", "--learning-rate", "2.5e-4", "--gamma", "0.99",
                                              "--gae-lambda", "0.95", "--clip-vloss"]),
    "ppo_discrete": ("ppo_discrete", []),
    "ppo_continuous": ("ppo_continuous", []),
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


def train_sps(script, args) -> dict:
    """One training run through the script's own train(): its overall and steady steps/s, its
    first iteration's seconds, and the split of its time into the three phases (each phase
    function timed by wrapping it for this call; train() looks them up when it calls them)."""
    agent, optimizer = script.make_agent_and_optimizer(args)
    timings, ends, start = dict(rollout=0.0, batch=0.0, update=0.0), [], time.perf_counter()

    def timed(name, fn):
        def call(**kwargs):
            t0 = time.perf_counter()
            try:
                return fn(**kwargs)
            finally:
                timings[name] += time.perf_counter() - t0
        return call

    def after_iteration(global_step, **_):
        ends.append((time.perf_counter() - start, global_step))
        return False

    phases = {"collect_rollout": "rollout", "make_batch": "batch", "update": "update"}
    real, compiles = {name: getattr(script, name) for name in phases}, script.Args.compiles
    try:
        for name, phase in phases.items():
            setattr(script, name, timed(phase, real[name]))
        script.Args.compiles = property(lambda self: self.compile)  # --compile measures any length of run
        steps = script.train(args, agent, optimizer, after_iteration=after_iteration)
    finally:
        script.Args.compiles = compiles
        for name, fn in real.items():
            setattr(script, name, fn)
    elapsed = time.perf_counter() - start
    (t1, s1), (tn, sn) = ends[0], ends[-1]
    timings["other"] = elapsed - sum(timings.values())
    return dict(sps=steps / elapsed, steady=(sn - s1) / (tn - t1), first=t1,
                split={k: v / elapsed for k, v in timings.items()})


def cold_compile() -> None:
    """Make the next torch.compile start from nothing, as a user's first run on a machine does: no
    graphs compiled earlier in this process, Inductor's graph caches off, and an empty folder for
    its on-disk kernel cache. (Kernels already loaded into this process can still be reused: a
    later repetition's compile can be shorter than the first one's.)"""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200_000, help="env steps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="also measure --compile")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput.md"))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    import tyro

    rows = []
    for config in opts.configs:
        name, flags = CONFIGS[config]
        script = {"ppo_discrete": ppo_discrete, "ppo_continuous": ppo_continuous}[name]
        args = tyro.cli(script.RunArgs, args=[*flags, "--total-timesteps", str(opts.steps), "--no-compile"])
        raws, eagers, compileds = [], [], []
        for rep in range(opts.reps):
            raws.append(raw_env_sps(script, args, opts.steps))
            eagers.append(train_sps(script, args))
            print(f"{config} rep {rep + 1}: raw {raws[-1]:,.0f} steps/s, train {eagers[-1]['sps']:,.0f} steps/s "
                  f"(steady {eagers[-1]['steady']:,.0f})", flush=True)
            if opts.compile:
                cold_compile()
                compileds.append(train_sps(script, replace(args, compile=True)))
                print(f"  compiled: {compileds[-1]['sps']:,.0f} steps/s (steady {compileds[-1]['steady']:,.0f}), "
                      f"first iteration {compileds[-1]['first']:.1f} s against {eagers[-1]['first']:.1f} s",
                      flush=True)

        def median(runs, key):
            return statistics.median(run[key] for run in runs)

        split = {k: statistics.median(run["split"][k] for run in eagers) for k in eagers[0]["split"]}
        comp = None
        if compileds:
            compile_s = max(c["first"] - e["first"] for c, e in zip(compileds, eagers))  # the coldest
            saved_per_step = 1 / median(eagers, "steady") - 1 / median(compileds, "steady")
            comp = (median(compileds, "sps"), median(compileds, "steady"), compile_s,
                    compile_s / saved_per_step if saved_per_step > 0 else None)
        rows.append((config, name, args, statistics.median(raws), median(eagers, "sps"), median(eagers, "steady"),
                     split, comp))

    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: "
             f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}, torch {torch.__version__}, one torch thread; "
             f"{opts.steps:,} env steps per measurement, median of {opts.reps}.",
             f"Command: `python benchmark/throughput.py --steps {opts.steps} --reps {opts.reps}"
             f"{' --compile' if opts.compile else ''}`", "",
             "Eager (`--no-compile`):", "",
             "| configuration | env x num_envs | batch / minibatch x epochs | raw env steps/s | training steps/s "
             "| training / raw | rollout | batch | update |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for config, name, args, raw, train, steady, split, comp in rows:
        lines.append(f"| {config} | {args.env_id} x {args.num_envs} | {args.batch_size} / {args.minibatch_size} x "
                     f"{args.update_epochs} | {raw:,.0f} | {train:,.0f} | {100 * train / raw:.0f}% | "
                     + " | ".join(f"{100 * split[k]:.0f}%" for k in ("rollout", "batch", "update")) + " |")
    if opts.compile:
        lines += ["", "Eager and `--compile` side by side (the whole gradient step compiled; compiling from nothing, "
                  "caches off):", "",
                  "| configuration | eager steps/s (steady) | compiled steps/s (steady) | compile time "
                  "| pays back after |",
                  "|---|---:|---:|---:|---:|"]
        for config, name, args, raw, train, steady, split, (c_sps, c_steady, compile_s, payback) in rows:
            verdict = f"{payback:,.0f} env steps" if payback else "never (not faster)"
            lines.append(f"| {config} | {train:,.0f} ({steady:,.0f}) | {c_sps:,.0f} ({c_steady:,.0f}) | "
                         f"{compile_s:.1f} s | {verdict} |")
        if len(rows) > 1:
            lines += ["", "Only the first configuration compiles from nothing: the later ones reuse kernels this process "
                      "compiled before, so their compile time is below a first run's."]
    lines += ["", "Flags: " + "; ".join(f"{config}: `{name}.py {' '.join(CONFIGS[config][1]) or '(defaults)'}`"
                                        for config, name, *_ in rows)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    with open(opts.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

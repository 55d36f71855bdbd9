"""Learning quality over several seeds, for one script and one or more flag configurations (issue 5).

    python benchmark/learning.py ppo_discrete                       # defaults, seeds 1-5, 2M steps
    python benchmark/learning.py ppo_continuous --seeds 1 2 3
    python benchmark/learning.py ppo_discrete --config cleanrl "--num-envs 4 --num-steps 128 \\
        --num-minibatches 4 --learning-rate 2.5e-4 --gamma 0.99 --gae-lambda 0.95 --clip-vloss"

Each (configuration, seed) is one training process of the script, at most as many at once as
there are cores, each with one torch thread. Each run evaluates the deterministic policy every
--eval-every-steps (on --periodic-eval-episodes episodes, 20 by default) and, at the end, on 100
episodes. Writes, under --out:
  learning_SCRIPT.md   per seed: final mean +/- std, first step with an evaluation mean >= 200,
                       wall time, steps/s; then the median, mean and worst over seeds
  learning_SCRIPT.png  evaluation return against env steps: median and min-max band over
                       seeds, one line per configuration, the 200 line drawn
  learning_SCRIPT.json every run's figures and curve. A later call reuses the runs found there
                       with the same configuration name, flags, seed and steps, so adding a
                       configuration does not repeat the others (--fresh to rerun everything).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOLVED = 200.0


def batch_size(script: str, flags: list[str]) -> int:
    sys.path.insert(0, ROOT)
    import tyro

    module = __import__(script)
    return tyro.cli(module.Args, args=flags).batch_size


def run_one(script: str, config: str, flags: list[str], seed: int, total: int, eval_every: int, runs_dir: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags, "--seed", str(seed), "--total-timesteps",
           str(total), "--eval-every", str(eval_every), "--runs-dir", runs_dir, "--exp-name", config,
           "--print-every", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    run_dir = next(line.split("run dir: ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run dir: "))
    with open(os.path.join(run_dir, "evaluation.json")) as f:
        final = json.load(f)
    curve = eval_curve(run_dir)
    print(f"{config} seed {seed}: {final['mean']:.1f} +/- {final['std']:.1f} in {wall:.0f} s", flush=True)
    return {"config": config, "flags": flags, "seed": seed, "total_timesteps": total, "eval_every": eval_every,
            "final": final, "curve": curve, "wall": wall,
            "sps": final["global_step"] / wall, "command": shlex.join(["python", f"{script}.py", *cmd[2:]])}


def eval_curve(run_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars("eval/mean_return")]


def first_solved(curve) -> int | None:
    return next((step for step, value in curve if value >= SOLVED), None)


def write_report(script: str, results: list[dict], configs: dict, opts) -> str:
    lines = [f"# {script}.py: learning over {len(opts.seeds)} seeds", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}), {min(opts.jobs, os.cpu_count())} runs at a time, one torch thread "
             f"each; {opts.total_timesteps:,} steps; final evaluation: 100 episodes of the deterministic policy; "
             f"curve: {opts.periodic_eval_episodes}-episode evaluations every {opts.eval_every_steps:,} steps.", "",
             f"Command: `python benchmark/learning.py {script} --seeds {' '.join(map(str, opts.seeds))} "
             f"--total-timesteps {opts.total_timesteps}"
             + "".join(f" --config {name} \"{' '.join(flags)}\"" for name, flags in configs.items() if name != "default")
             + "`", ""]
    for name, flags in configs.items():
        rows = sorted((r for r in results if r["config"] == name), key=lambda r: r["seed"])
        finals = [r["final"]["mean"] for r in rows]
        solved = [first_solved(r["curve"]) for r in rows]
        lines += [f"## {name}: `{' '.join(flags) or '(script defaults)'}`", "",
                  "| seed | final evaluation | first step with evaluation >= 200 | wall time | steps/s |",
                  "|---:|---:|---:|---:|---:|"]
        for r, s in zip(rows, solved):
            lines.append(f"| {r['seed']} | {r['final']['mean']:.1f} +/- {r['final']['std']:.1f} | "
                         f"{'never' if s is None else f'{s:,}'} | {r['wall']:.0f} s | {r['sps']:,.0f} |")
        lines += ["", f"Median of the final means {statistics.median(finals):.1f}, mean {statistics.mean(finals):.1f}, "
                  f"worst {min(finals):.1f}; seeds reaching 200 by 1,000,000 steps: "
                  f"{sum(s is not None and s <= 1_000_000 for s in solved)} of {len(rows)}.", ""]
    return "\n".join(lines)


def plot(script: str, results: list[dict], configs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in configs:
        curves = [r["curve"] for r in results if r["config"] == name]
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        values = np.array([[v for _, v in c[:n]] for c in curves])
        (line,) = ax.plot(steps, np.median(values, 0), label=f"{name} (median of {len(curves)} seeds)")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(SOLVED, color="gray", linestyle="--", linewidth=1, label="solved (200)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("deterministic evaluation return")
    ax.set_title(f"{script}.py: median and min-max over seeds")
    ax.set_ylim(bottom=-300)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=["ppo_discrete", "ppo_continuous"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--total-timesteps", type=int, default=2_000_000)
    parser.add_argument("--eval-every-steps", type=int, default=100_000, help="about this often (whole iterations)")
    parser.add_argument("--periodic-eval-episodes", type=int, default=20)
    parser.add_argument("--config", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                        help="another configuration to compare with the defaults; repeatable")
    parser.add_argument("--no-default", action="store_true", help="run only the --config configurations")
    parser.add_argument("--fresh", action="store_true", help="rerun every run, ignoring the saved ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at once (at most the cores)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--runs-dir", default=os.path.join(HERE, "out", "runs"))
    opts = parser.parse_args()

    configs = {} if opts.no_default else {"default": []}
    configs.update({name: shlex.split(flags) for name, flags in opts.config})
    saved_path = os.path.join(opts.out, f"learning_{opts.script}.json")
    saved = []
    if os.path.exists(saved_path) and not opts.fresh:
        with open(saved_path) as f:
            saved = json.load(f)
    jobs, results = [], []
    for name, flags in configs.items():
        flags = [*flags, "--periodic-eval-episodes", str(opts.periodic_eval_episodes)]
        every = max(1, round(opts.eval_every_steps / batch_size(opts.script, flags)))
        for seed in opts.seeds:
            job = (opts.script, name, flags, seed, opts.total_timesteps, every, opts.runs_dir)
            old = [r for r in saved if (r["config"], r.get("flags"), r["seed"], r.get("total_timesteps"),
                                        r.get("eval_every")) == (name, flags, seed, opts.total_timesteps, every)]
            if old:
                print(f"{name} seed {seed}: reusing the saved run ({old[0]['final']['mean']:.1f})", flush=True)
                results.append(old[0])
            else:
                jobs.append(job)
    with ThreadPoolExecutor(max_workers=min(opts.jobs, os.cpu_count())) as pool:
        results += list(pool.map(lambda job: run_one(*job), jobs))

    os.makedirs(opts.out, exist_ok=True)
    report = write_report(opts.script, results, configs, opts)
    md, png = (os.path.join(opts.out, f"learning_{opts.script}.{ext}") for ext in ("md", "png"))
    plot(opts.script, results, configs, png)
    with open(md, "w") as f:
        f.write(report + f"\n![evaluation curves](learning_{opts.script}.png)\n")
    with open(os.path.join(opts.out, f"learning_{opts.script}.json"), "w") as f:
        json.dump(results, f)
    print("\n" + report)


if __name__ == "__main__":
    main()

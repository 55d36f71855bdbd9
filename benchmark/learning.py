"""Learning quality over several seeds: one script's configurations on one env, or a list of envs (issues 5, 10).

    python benchmark/learning.py ppo_discrete                       # defaults, seeds 1-5, 2M steps
    python benchmark/learning.py ppo_continuous --seeds 1 2 3
    python benchmark/learning.py ppo_discrete --config cleanrl "--num-envs 4 --num-steps 128 \\
        --num-minibatches 4 --learning-rate 2.5e-4 --gamma 0.99 --gae-lambda 0.95 --clip-vloss"
    python benchmark/learning.py ppo_continuous --env-id Pendulum-v1 --no-default --seeds 1 \\
        --total-timesteps 200000 --config g09 "--gamma 0.9 --num-envs 4"     # a trial on another env
    python benchmark/learning.py --envs CartPole-v1 Pendulum-v1 --jobs 1    # the README commands
    python benchmark/learning.py --envs all --jobs 1                        # of every env in envs.py

Each (configuration, seed) is one training process of the script, at most --jobs at once (by
default as many as there are cores), each with one torch thread. Each run evaluates the
deterministic policy every --eval-every-steps (on 20 episodes: the script's --eval-episodes / 5)
and, at the end, on 100 episodes. The env's threshold is Gymnasium's `reward_threshold`
(envs.py gives one where the spec has none). With --envs, each env's command (flags, steps,
seeds, evaluation interval) comes from benchmark/envs.py. Writes, under --out, per script and env
(the stem is learning_SCRIPT for the script's default env, learning_SCRIPT_ENV otherwise):
  STEM.md    per configuration and seed: final mean +/- std, first step with an evaluation mean
             >= the threshold, wall time, steps/s; then the median, mean and worst over seeds
  STEM.png   evaluation return against env steps: median and min-max band over seeds, one line
             per configuration, the threshold drawn
  STEM.json  every run's figures and curve, for every configuration ever run on that env. A later
             call reuses the runs found there with the same configuration name, flags, seed, steps,
             evaluation interval and code (a hash of the script's source and defaults: runs of other
             code are rerun), so adding a configuration or an env does not repeat the others
             (--fresh to rerun this call's); redefining a configuration's name replaces it. Each run
             records its date, the code's hash and how many runs were in flight beside it; a table
             shows only what its runs recorded.
and with --envs, other_environments.md: one row per env of envs.py that has its runs.
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(0, HERE)
from envs import ENVS  # noqa: E402

DEFAULT_ENV = {"ppo_discrete": "LunarLander-v3", "ppo_continuous": "LunarLanderContinuous-v3"}
PLOT_BOTTOM = {"LunarLander-v3": -300, "LunarLanderContinuous-v3": -300}


def batch_size(script: str, flags: list[str]) -> int:
    sys.path.insert(0, ROOT)
    import tyro

    module = __import__(script)
    return tyro.cli(module.RunArgs, args=flags).batch_size


def code_version(script: str) -> str:
    """A short hash of the script's source and its defaults: a saved run is reused only for the code that made it."""
    sys.path.insert(0, ROOT)
    from dataclasses import asdict

    module = __import__(script)
    with open(os.path.join(ROOT, f"{script}.py"), "rb") as f:
        source = f.read()
    defaults = json.dumps(asdict(getattr(module, "RunArgs", module.Args)()), sort_keys=True, default=str).encode()
    return hashlib.sha256(source + b"\0" + defaults).hexdigest()[:12]


def threshold(env_id: str) -> float:
    """Gymnasium's reward_threshold, or the one envs.py sets where the spec has none."""
    import gymnasium as gym

    value = ENVS.get(env_id, {}).get("threshold", gym.spec(env_id).reward_threshold)
    if value is None:
        raise SystemExit(f"{env_id} has no reward_threshold: give one in benchmark/envs.py")
    return float(value)


def stem(script: str, env_id: str) -> str:
    return f"learning_{script}" if env_id == DEFAULT_ENV[script] else f"learning_{script}_{env_id}"


def user_command(script: str, flags: list[str], total: int) -> str:
    """What a user types to train this configuration (seed 1, the script's default); flags as saved."""
    return shlex.join(["python", f"{script}.py", *flags, "--total-timesteps", str(total)])


def run_one(script: str, config: str, flags: list[str], seed: int, total: int, eval_every: int, runs_dir: str,
            jobs: int, code: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags, "--seed", str(seed), "--total-timesteps",
           str(total), "--eval-every", str(eval_every), "--runs-dir", runs_dir, "--exp-name", config]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started, start = time.time(), time.perf_counter()
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
            "final": final, "curve": curve, "wall": wall, "sps": final["global_step"] / wall,
            "date": time.strftime("%Y-%m-%d"), "jobs": jobs, "code": code, "started": started, "ended": time.time(),
            "command": shlex.join(["python", f"{script}.py", *cmd[2:]])}


def record_overlap(runs: list[dict]) -> None:
    """Each run's "at_once": the most runs of this call in flight at one moment during it (itself included)."""
    for r in runs:
        points = [s["started"] for s in runs if r["started"] <= s["started"] < r["ended"]] + [r["started"]]
        r["at_once"] = max(sum(s["started"] <= p < s["ended"] for s in runs) for p in points)


def eval_curve(run_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars("eval/mean_return")]


def first_reached(curve, level: float) -> int | None:
    return next((step for step, value in curve if value >= level), None)


def by_config(results: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by configuration, in the order the configurations first appear."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["config"], []).append(r)
    return {name: sorted(rows, key=lambda r: r["seed"]) for name, rows in groups.items()}


def write_report(script: str, env_id: str, results: list[dict], opts) -> str:
    level = threshold(env_id)
    lines = [f"# {script}.py on {env_id}: learning over several seeds", "",
             f"Machine: {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}), one torch thread per run. Final evaluation: 100 episodes of the "
             f"deterministic policy; curve: 20-episode evaluations during training. "
             f"Threshold: {level:g} ({'benchmark/envs.py' if 'threshold' in ENVS.get(env_id, {}) else 'Gymnasium'}"
             f"'s reward_threshold). Wall time covers training, the periodic and the final evaluations and "
             f"the start of the process; steps/s is training steps over that wall time.", ""]
    for name, rows in by_config(results).items():
        flags, total = rows[0]["flags"], rows[0]["total_timesteps"]
        finals = [r["final"]["mean"] for r in rows]
        reached = [first_reached(r["curve"], level) for r in rows]
        readme = " (the README's command)" if ENVS.get(env_id, {}).get("config") == name else ""
        lines += [f"## {name}{readme}", "", f"`{user_command(script, flags, total)}` plus `--seed N`; "
                  f"{recorded(rows)}", "",
                  f"| seed | final evaluation | first step with evaluation >= {level:g} | wall time | steps/s |",
                  "|---:|---:|---:|---:|---:|"]
        for r, s in zip(rows, reached):
            lines.append(f"| {r['seed']} | {r['final']['mean']:.1f} +/- {r['final']['std']:.1f} | "
                         f"{'never' if s is None else f'{s:,}'} | {r['wall']:.0f} s | {r['sps']:,.0f} |")
        lines += ["", f"Median of the final means {statistics.median(finals):.1f}, mean {statistics.mean(finals):.1f}, "
                  f"worst {min(finals):.1f}; seeds reaching {level:g}: {sum(s is not None for s in reached)} of "
                  f"{len(rows)}" + (f" ({sum(s is not None and s <= total // 2 for s in reached)} by "
                                    f"{total // 2:,} steps)." if len(rows) else "."), ""]
    return "\n".join(lines)


def recorded(rows: list[dict]) -> str:
    """When, how many at a time and with which code the runs were made: what they recorded, nothing filled in."""
    def listed(key: str) -> str:
        values = sorted({str(r[key]) for r in rows if r.get(key) is not None})
        missing = sum(r.get(key) is None for r in rows)
        text = ", ".join(values) or "not recorded"
        return text + (f" ({missing} of {len(rows)} runs did not record it)" if values and missing else "")

    at_once = listed("at_once") if any(r.get("at_once") for r in rows) else None
    limit = listed("jobs") if any(r.get("jobs") for r in rows) else None
    concurrency = (f"runs in flight at once {at_once}" if at_once else
                   f"at most {limit} runs at a time (the --jobs limit; the actual number was not recorded)"
                   if limit else "runs at a time: not recorded")
    date = f"measured {listed('date')}" if any(r.get("date") for r in rows) else "date not recorded"
    code = f"code {listed('code')}" if any(r.get("code") for r in rows) else "code version not recorded"
    return f"{date}; {concurrency}; {code}."


def plot(script: str, env_id: str, results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    level = threshold(env_id)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in by_config(results).items():
        curves = [r["curve"] for r in rows]
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        values = np.array([[v for _, v in c[:n]] for c in curves])
        readme = ", the README's" if ENVS.get(env_id, {}).get("config") == name else ""
        (line,) = ax.plot(steps, np.median(values, 0), label=f"{name} (median of {len(curves)} seeds{readme})")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=f"threshold ({level:g})")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("deterministic evaluation return")
    ax.set_title(f"{script}.py on {env_id}: median and min-max over seeds")
    if env_id in PLOT_BOTTOM:
        ax.set_ylim(bottom=PLOT_BOTTOM[env_id])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def span(values: list[float]) -> str:
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return low if low == high else f"{low}-{high}"


def summary(out: str) -> str:
    """One row per env of envs.py whose README configuration has all its seeds saved."""
    lines = ["# Other environments: the README command of each env", "",
             "Written by `python benchmark/learning.py --envs ...` from the per-env files beside this one. "
             "First step at the threshold: the first 20-episode periodic evaluation whose mean reached it "
             "(range over the seeds that did). Wall time per run includes the periodic evaluations.", "",
             "| env | command | seeds | final mean | worst seed | threshold | first step at threshold | "
             "wall time per run | steps/s | anchors |", "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for env_id, spec in ENVS.items():
        path = os.path.join(out, f"{stem(spec['script'], env_id)}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [r for r in json.load(f) if r["config"] == spec["config"] and r["seed"] in spec["seeds"]
                    and r["total_timesteps"] == spec["total_timesteps"]]
        if {r["seed"] for r in rows} != set(spec["seeds"]):
            continue
        level = threshold(env_id)
        finals = [r["final"]["mean"] for r in rows]
        reached = [s for s in (first_reached(r["curve"], level) for r in rows) if s is not None]
        when = "never" if not reached else (f"{min(reached):,}-{max(reached):,}" if min(reached) != max(reached)
                                            else f"{reached[0]:,}")
        when += "" if len(reached) == len(rows) else f" ({len(reached)} of {len(rows)} seeds)"
        walls, sps = [r["wall"] for r in rows], [r["sps"] for r in rows]
        lines.append(f"| {env_id} | `{user_command(spec['script'], rows[0]['flags'], spec['total_timesteps'])}` | "
                     f"{len(rows)} | {statistics.mean(finals):.1f} | {min(finals):.1f} | {level:g} | {when} | "
                     f"{span(walls)} s | {statistics.mean(sps):,.0f} | {spec['anchors']} |")
    return "\n".join(lines) + "\n"


def run_configs(script: str, env_id: str, configs: dict, seeds: list[int], total: int, opts) -> None:
    """Train what is not saved yet, merge it into the env's file and rewrite its table and plot."""
    saved_path = os.path.join(opts.out, f"{stem(script, env_id)}.json")
    saved = []
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
    env_flags = [] if env_id == DEFAULT_ENV[script] else ["--env-id", env_id]
    jobs, keep = [], []
    at_once = max(1, min(opts.jobs, os.cpu_count()))
    code = code_version(script)
    for name, flags in configs.items():
        flags = [*env_flags, *flags]
        every = max(1, round(opts.eval_every_steps / batch_size(script, flags)))
        for seed in seeds:
            old = [r for r in saved if (r["config"], r.get("flags"), r["seed"], r.get("total_timesteps"),
                                        r.get("eval_every"), r.get("code")) == (name, flags, seed, total, every, code)]
            if old and not opts.fresh:
                print(f"{env_id} {name} seed {seed}: reusing the saved run ({old[0]['final']['mean']:.1f})", flush=True)
                keep.append(old[0])
            else:
                jobs.append((script, name, flags, seed, total, every, opts.runs_dir, at_once, code))
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        new = list(pool.map(lambda job: run_one(*job), jobs))
    record_overlap(new)
    # A configuration named in this call keeps only its runs of this call; the others stay as saved.
    order = list(dict.fromkeys([r["config"] for r in saved] + list(configs)))
    results = [r for r in saved if r["config"] not in configs] + keep + new
    results.sort(key=lambda r: (order.index(r["config"]), r["seed"]))
    os.makedirs(opts.out, exist_ok=True)
    with open(saved_path, "w") as f:
        json.dump(results, f)
    report = write_report(script, env_id, results, opts)
    base = stem(script, env_id)
    plot(script, env_id, results, os.path.join(opts.out, f"{base}.png"))
    with open(os.path.join(opts.out, f"{base}.md"), "w") as f:
        f.write(report + f"\n![evaluation curves]({base}.png)\n")
    print("\n" + report, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", nargs="?", choices=["ppo_discrete", "ppo_continuous"],
                        help="compare configurations of this script on one env (not with --envs)")
    parser.add_argument("--env-id", help="the env for SCRIPT (default: its default env, Lunar Lander)")
    parser.add_argument("--envs", nargs="+", metavar="ENV",
                        help="run the README command of each of these envs from benchmark/envs.py ('all': every one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="(not with --envs)")
    parser.add_argument("--total-timesteps", type=int, default=2_000_000, help="(not with --envs)")
    parser.add_argument("--eval-every-steps", type=int, default=100_000,
                        help="about this often (whole iterations; not with --envs)")
    parser.add_argument("--config", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                        help="another configuration to compare with the defaults; repeatable")
    parser.add_argument("--no-default", action="store_true", help="run only the --config configurations")
    parser.add_argument("--fresh", action="store_true", help="rerun this call's runs, ignoring the saved ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at once (at most the cores)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--runs-dir", default=os.path.join(HERE, "out", "runs"))
    opts = parser.parse_args()
    if (opts.script is None) == (opts.envs is None):
        parser.error("give either SCRIPT or --envs")

    if opts.script:
        configs = {} if opts.no_default else {"default": []}
        configs.update({name: shlex.split(flags) for name, flags in opts.config})
        env_id = opts.env_id or DEFAULT_ENV[opts.script]
        run_configs(opts.script, env_id, configs, opts.seeds, opts.total_timesteps, opts)
        return
    env_ids = list(ENVS) if opts.envs == ["all"] else opts.envs
    unknown = [e for e in env_ids if e not in ENVS]
    if unknown:
        parser.error(f"not in benchmark/envs.py: {', '.join(unknown)}")
    for env_id in env_ids:
        spec = ENVS[env_id]
        opts.eval_every_steps = spec["eval_every_steps"]
        run_configs(spec["script"], env_id, {spec["config"]: shlex.split(spec["flags"])}, spec["seeds"],
                    spec["total_timesteps"], opts)
    with open(os.path.join(opts.out, "other_environments.md"), "w") as f:
        f.write(summary(opts.out))
    print(summary(opts.out))


if __name__ == "__main__":
    main()

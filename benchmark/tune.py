"""Hyperparameter search for ppo_discrete.py or ppo_continuous.py on Optuna (issue 11).

    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 20 --total-timesteps 100000
    python benchmark/tune.py ppo_discrete --trials 40 --seeds 2 --total-timesteps 600000 \\
        --objective steps --target 200 --space gamma=0.99,0.995,0.999 --num-envs 16
    python benchmark/tune.py ppo_continuous --env-id Pendulum-v1 --trials 0   # summary only

Every trial runs the script as a subprocess (OMP_NUM_THREADS=1) on --seeds seeds, one after the
other, and reads its stdout as it comes: the script's periodic deterministic evaluations
(--eval-every) are reported to Optuna, and a trial whose curve falls below the median of the
complete trials at the same step is stopped (SIGTERM) and recorded as pruned. Any flag of the
script given here (--env-id, --total-timesteps, --num-envs, ...) is passed to every trial and,
if it names a searched hyperparameter, takes it out of the search.

The study lives in a folder (benchmark/studies/NAME by default): the storage (an Optuna journal
file, no server), the trials' logs and run directories, and at the end (or on Ctrl-C) summary.md,
best.json and history.png. Running the same command again continues the study; so does the
same command on other machines with a shared --storage (a journal file on a shared file system,
or an RDB URL such as postgresql://user@host/db). --workers N runs N trials at once here.
--trials N is the study's total of finished (complete or pruned) trials, over every worker and
machine. See benchmark/TUNING.md.

Design notes. Ideas from CleanRL's tuner (cleanrl_utils/tuner.py: an Optuna study over the
script run as-is, several seeds per trial), rl-baselines3-zoo (utils/exp_manager.py: TPE with a
median pruner on periodic evaluations, a `.log` storage as an Optuna journal file, the search
spaces in one file) and Optuna's documentation (ask-and-tell, JournalStorage, TrialState).
Workers use Optuna's ask-and-tell interface rather than study.optimize so that the trial budget
is exact over several workers and machines, and so that Ctrl-C ends every running trial cleanly.
Optuna's own heartbeat is only for RDB storages inside study.optimize, so each trial here keeps
a heartbeat in a user attribute; a trial whose worker died is marked failed by the next worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------
# 1. The search space: one readable place. A name is a field of the script's Args (or
#    minibatch_size, turned into --num-minibatches); override any entry with --space NAME=SPEC.
#    SPEC: "log:LOW:HIGH" (log-uniform float), "float:LOW:HIGH", "int:LOW:HIGH", "A,B,C" (a choice),
#    or one value (fixed: no longer searched, passed to every trial).
# ---------------------------------------------------------------------------------------------
SPACE = {
    "learning_rate": "log:5e-5:3e-3",
    "num_envs": "4,8,16,32",
    "num_steps": "64,128,256,512,1024,2048",
    "minibatch_size": "32,64,128,256,512,1024",  # capped at the batch (num_envs x num_steps)
    "update_epochs": "int:1:10",
    "gamma": "0.98,0.99,0.995,0.999,0.9999",
    "gae_lambda": "0.9,0.95,0.98,0.99,1.0",
    "ent_coef": "log:1e-5:0.05",
    "clip_coef": "0.1,0.2,0.3",
    "hidden_size": "32,64,128,256",
}
# Flags the tuner sets on every trial itself.
RESERVED = {"seed", "eval_every", "periodic_eval_episodes", "runs_dir", "exp_name", "print_every",
            "resume", "eval_checkpoint"}
EVAL_LINE = re.compile(r"eval at step ([\d,]+): (\S+) \+/- \S+ over \d+ episodes")
COUNTED = ("COMPLETE", "PRUNED", "RUNNING")  # trial states that use up the --trials budget


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str  # log, float, int, choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()


def parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(name: str, spec: str) -> Param | object:
    """A Param for a searched entry, or the plain value of a fixed one; ValueError if malformed."""
    kind, _, rest = spec.partition(":")
    if kind in ("log", "float", "int"):
        low, high = (int(x) if kind == "int" else float(x) for x in rest.split(":"))
        if not low < high or (kind == "log" and low <= 0):
            raise ValueError(f"{name}={spec}: need LOW < HIGH (and LOW > 0 for log)")
        return Param(kind, low, high)
    values = tuple(parse_value(v) for v in spec.split(","))
    return values[0] if len(values) == 1 else Param("choice", choices=values)


def suggest(trial, space: dict[str, Param]) -> dict:
    params = {}
    for name, p in space.items():
        if p.kind == "choice":
            params[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            params[name] = trial.suggest_int(name, p.low, p.high)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.kind == "log")
    return params


def fits(p: Param, value) -> bool:
    if p.kind == "choice":
        return value in p.choices
    return isinstance(value, (int, float)) and p.low <= value <= p.high


# ---------------------------------------------------------------------------------------------
# 2. One trial: its flags, one seed's process read line by line, the objective over seeds
# ---------------------------------------------------------------------------------------------
def flag_text(name: str, value) -> list[str]:
    name = name.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", f"{value:.4g}" if isinstance(value, float) else str(value)]


def param_flags(params: dict, base) -> list[str]:
    """The script flags for one trial's hyperparameters; base: the Args of the fixed flags."""
    flags = []
    for name, value in params.items():
        if name != "minibatch_size":
            flags += flag_text(name, value)
    if "minibatch_size" in params:
        batch = params.get("num_envs", base.num_envs) * params.get("num_steps", base.num_steps)
        flags += flag_text("num_minibatches", max(1, batch // params["minibatch_size"]))
    return flags


class Pruned(Exception):
    pass


class Failed(Exception):
    pass


class Interrupted(Exception):
    pass


@dataclasses.dataclass
class SeedResult:
    seed: int
    value: float  # this seed's share of the objective
    final: Optional[float]  # the final evaluation's mean (None when stopped at the target)
    best_eval: Optional[float]
    solved_step: Optional[int]  # first periodic evaluation >= --target
    solved_seconds: Optional[float]
    steps: int
    wall: float


class Tuner:
    """Runs trials for one study: the configuration, the running processes, the heartbeat."""

    def __init__(self, cfg, study):
        self.cfg, self.study = cfg, study
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.active: dict[int, object] = {}  # trial number -> optuna Trial, for the heartbeat
        self.failures = 0
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    # -- one seed ------------------------------------------------------------------------------
    def command(self, flags: list[str], seed: int, trial_number: int) -> list[str]:
        cfg = self.cfg
        return [sys.executable, os.path.join(ROOT, f"{cfg.script}.py"), *flags, "--seed", str(seed),
                "--eval-every", str(cfg.eval_every_iters(flags)), "--periodic-eval-episodes",
                str(cfg.periodic_eval_episodes), "--runs-dir", os.path.join(cfg.study_dir, "runs"),
                "--exp-name", f"trial{trial_number}", "--print-every", "60"]

    def run_seed(self, trial, flags: list[str], seed: int, index: int) -> SeedResult:
        """Run one seed, report its evaluations; stop it on pruning, on reaching the target in
        the steps/time objectives, or on Ctrl-C. Raises Pruned, Failed or Interrupted."""
        cfg = self.cfg
        cmd = self.command(flags, seed, trial.number)
        log_path = os.path.join(cfg.study_dir, "logs", f"trial{trial.number:04d}_seed{seed}.log")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.perf_counter()
        best, solved, solved_s, stopped_for, reported, tail, run_dir, last_step = None, None, None, None, set(), [], None, 0
        with self.lock:
            if self.stop.is_set():
                raise Interrupted()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env=env)
            self.procs.add(proc)
        try:
            with open(log_path, "w") as log:
                log.write(shlex.join(cmd) + "\n")
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-5:]
                    if line.startswith("run dir: "):
                        run_dir = line[len("run dir: "):].strip()
                    match = EVAL_LINE.match(line)
                    if not match or stopped_for:
                        continue
                    step, mean = int(match[1].replace(",", "")), float(match[2])
                    last_step = step
                    best = mean if best is None or mean > best else best
                    if cfg.target is not None and mean >= cfg.target and solved is None:
                        solved, solved_s = step, time.perf_counter() - start
                        if cfg.objective != "final":
                            stopped_for = "target"
                    grid = index * cfg.total_timesteps + round(step / cfg.eval_every_steps) * cfg.eval_every_steps
                    if grid not in reported and math.isfinite(mean):
                        reported.add(grid)
                        trial.report(mean if cfg.objective == "final" else -mean, grid)
                        if not stopped_for and trial.should_prune():
                            stopped_for = "prune"
                    if stopped_for:
                        proc.send_signal(signal.SIGTERM)  # the script saves and exits 143
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            with self.lock:
                self.procs.discard(proc)
        wall = time.perf_counter() - start
        if stopped_for == "prune":
            raise Pruned(f"pruned at step {last_step:,} of seed {seed} (evaluation {best:.1f} at best)")
        # Killed by a signal (-N, or 128 + N from the script's own handler): if it was a Ctrl-C,
        # the tuner's handler sets `stop` in the main thread, maybe a moment after the child ended.
        signalled = code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
        if stopped_for is None and code != 0 and self.stop.wait(2.0 if signalled else 0.0):
            raise Interrupted()
        if stopped_for == "target":
            value = solved if cfg.objective == "steps" else solved_s
            return SeedResult(seed, float(value), None, best, solved, solved_s, last_step, wall)
        if code == 1 and any("diverged" in line for line in tail):
            raise Pruned(f"diverged (seed {seed}): {tail[-1]}")
        if code != 0 or run_dir is None:
            raise Failed(f"seed {seed} exited with code {code}: {tail[-1] if tail else 'no output'} (log: {log_path})")
        with open(os.path.join(run_dir, "evaluation.json")) as f:
            evaluation = json.load(f)
        final, steps = evaluation["mean"], evaluation["global_step"]
        if final is None:
            raise Failed(f"seed {seed}: the final evaluation is not finite")
        if cfg.objective == "final":
            value = final
        else:  # the target was not reached: worth more than the whole run, more the further it fell short
            reach = max(best if best is not None else final, final)
            penalty = 1 + max(0.0, cfg.target - reach) / max(abs(cfg.target), 1.0)
            value = (steps if cfg.objective == "steps" else wall) * penalty
        return SeedResult(seed, float(value), final, best, solved, solved_s, steps, wall)

    # -- one trial -----------------------------------------------------------------------------
    def run_trial(self, trial) -> tuple[float, float]:
        """The objective over the seeds, run one after the other: (the mean, the worst seed)."""
        cfg = self.cfg
        params = suggest(trial, cfg.space)
        flags = cfg.fixed_flags + param_flags(params, cfg.base)
        trial.set_user_attr("flags", flags)
        trial.set_user_attr("command", shlex.join(["python", f"{cfg.script}.py", *flags, "--seed", str(cfg.seeds[0])]))
        print(f"trial {trial.number} started: {' '.join(param_flags(params, cfg.base))}", flush=True)
        results = []
        for index, seed in enumerate(cfg.seeds):
            results.append(self.run_seed(trial, flags, seed, index))
            trial.set_user_attr("seeds", [dataclasses.asdict(r) for r in results])
        values = [r.value for r in results]
        worst = min(values) if cfg.objective == "final" else max(values)
        trial.set_user_attr("worst", worst)
        return statistics.mean(values), worst

    def finish(self, trial) -> None:
        """Run a trial and tell Optuna how it ended: complete, pruned or failed, never left running."""
        from optuna.trial import TrialState

        start = time.perf_counter()
        try:
            value, worst = self.run_trial(trial)
        except Pruned as e:
            trial.set_user_attr("reason", str(e))
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"trial {trial.number} {e}", flush=True)
        except Interrupted:
            trial.set_user_attr("reason", "interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} interrupted: recorded as failed", flush=True)
        except Exception as e:  # noqa: BLE001  (any fault of a trial is the trial's, not the study's)
            reason = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
            trial.set_user_attr("reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            with self.lock:
                self.failures += 1
            print(f"trial {trial.number} failed: {reason}", flush=True)
        else:
            self.study.tell(trial, value)
            print(f"trial {trial.number} complete: {value:,.1f} (worst seed {worst:,.1f}) "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            with self.lock:
                self.active.pop(trial.number, None)

    # -- the budget, stale trials, the heartbeat ------------------------------------------------
    def ask(self):
        """A new trial, or None once the study holds --trials complete, pruned or running ones.
        Under a lock file in the study folder, so workers here and on machines sharing the folder
        never overshoot the budget together."""
        from optuna.storages.journal import JournalFileOpenLock
        from optuna.trial import TrialState

        lock = JournalFileOpenLock(os.path.join(self.cfg.study_dir, "budget"))
        with self.lock:
            if self.stop.is_set() or self.failures >= self.cfg.max_failures:
                return None
            lock.acquire()
            try:
                self.fail_stale()
                states = tuple(getattr(TrialState, s) for s in COUNTED)
                if len(self.study.get_trials(deepcopy=False, states=states)) >= self.cfg.trials:
                    return None
                trial = self.study.ask()
                trial.set_user_attr("worker", self.worker)
                trial.set_user_attr("heartbeat", time.time())
                self.active[trial.number] = trial
                return trial
            finally:
                lock.release()

    def fail_stale(self) -> None:
        """Mark failed the running trials whose worker is gone: a process of this machine that no
        longer exists, or no heartbeat for --stale-after seconds."""
        from optuna.trial import TrialState

        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in self.active:
                continue
            worker = t.user_attrs.get("worker", "")
            beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else 0)
            where, _, pid = worker.rpartition(":")
            gone = worker == self.worker or (where == host and pid.isdigit() and not pid_alive(int(pid)))
            if gone or time.time() - beat > self.cfg.stale_after:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                print(f"trial {t.number} of {worker or 'an unknown worker'} was left running by a worker that is "
                      f"gone: recorded as failed", flush=True)

    def heartbeat(self) -> None:
        while not self.stop.wait(self.cfg.heartbeat):
            with self.lock:
                trials = list(self.active.values())
            for trial in trials:
                try:
                    trial.set_user_attr("heartbeat", time.time())
                except Exception:  # noqa: BLE001  (finished meanwhile)
                    pass

    def worker_loop(self) -> None:
        while (trial := self.ask()) is not None:
            self.finish(trial)

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# 3. The summary: the best trials, the command that reproduces the best, the history plot
# ---------------------------------------------------------------------------------------------
OBJECTIVES = {
    "final": "the mean over seeds of the final deterministic evaluation (higher is better)",
    "steps": "the mean over seeds of the env steps to the first periodic evaluation >= the target (lower is better)",
    "time": "the mean over seeds of the wall seconds to the first periodic evaluation >= the target "
            "(process start to that line, evaluations included; lower is better)",
}


def summarize(study, cfg) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == getattr(TrialState, s) for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    maximize = cfg.objective == "final"
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=maximize)
    lines = [f"# Study {study.study_name}", "",
             f"Script {cfg.script}.py, fixed flags `{' '.join(cfg.fixed_flags) or '(none)'}`, seeds "
             f"{', '.join(map(str, cfg.seeds))}; objective: {OBJECTIVES[cfg.objective]}"
             + (f", target {cfg.target:g}" if cfg.target is not None else "") + ".", "",
             f"Trials: {len(trials)} ({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
             f"{counts['FAIL']} failed, {counts['RUNNING']} running). Written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if not done:
        return "\n".join(lines + ["No complete trial yet."])
    names = list(cfg.space)
    lines += [f"## The best {min(cfg.top, len(done))} trials", "",
              "| trial | value | worst seed | per seed | " + " | ".join(names) + " |",
              "|---:|---:|---:|---|" + "---:|" * len(names)]
    for t in done[:cfg.top]:
        per_seed = ", ".join(describe_seed(s, cfg) for s in t.user_attrs.get("seeds", []))
        lines.append(f"| {t.number} | {t.value:,.1f} | {t.user_attrs.get('worst', float('nan')):,.1f} | {per_seed} | "
                     + " | ".join(format_param(t.params.get(n)) for n in names) + " |")
    best = done[0]
    lines += ["", f"Best: trial {best.number}, {best.value:,.1f}. Reproduce it (seed {cfg.seeds[0]}):", "",
              "```", best.user_attrs.get("command", "?"), "```", ""]
    return "\n".join(lines)


def describe_seed(s: dict, cfg) -> str:
    text = f"{s['seed']}: " + (f"final {s['final']:.1f}" if s.get("final") is not None else "stopped at the target")
    if s.get("solved_step") is not None:
        text += f", >= {cfg.target:g} at {s['solved_step']:,} steps ({s['solved_seconds']:.0f} s)"
    return text


def format_param(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_history(study, cfg, path: str) -> None:
    """Left: each trial's value and the best so far; right: the reported evaluation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    maximize = cfg.objective == "final"
    trials = study.get_trials(deepcopy=False)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    ax1.scatter([t.number for t in done], [t.value for t in done], s=14, label="complete")
    best, xs, ys = None, [], []
    for t in done:
        best = t.value if best is None or (t.value > best if maximize else t.value < best) else best
        xs.append(t.number)
        ys.append(best)
    ax1.step(xs, ys, where="post", color="C3", label="best so far")
    zoom(ax1, [t.value for t in done], maximize)
    ax1.set_xlabel("trial")
    ax1.set_ylabel({"final": "final evaluation", "steps": "env steps to target", "time": "seconds to target"}[cfg.objective])
    ax1.set_title(f"{study.study_name}: optimization history")
    ax1.legend()
    ax1.grid(alpha=0.3)
    sign, curves = 1 if maximize else -1, []
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            color = {TrialState.COMPLETE: "C0", TrialState.PRUNED: "C1"}.get(t.state, "gray")
            curves += [sign * t.intermediate_values[s] for s in steps]
            ax2.plot(steps, curves[-len(steps):], color=color, alpha=0.6, linewidth=1)
    zoom(ax2, curves, True)
    ax2.set_xlabel(f"env steps (seed k's curve starts at (k - 1) x {cfg.total_timesteps:,})")
    ax2.set_ylabel("periodic evaluation return")
    ax2.set_title("evaluations (blue: complete, orange: pruned, gray: failed)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def zoom(ax, values: list[float], maximize: bool) -> None:
    """Keep a few disastrous trials from squashing the rest: cut the axis at the worst decile."""
    if len(values) >= 10:
        ordered = sorted(values) if maximize else sorted(values, reverse=True)
        worst, best = ordered[len(ordered) // 10], ordered[-1]
        margin = 0.1 * abs(best - worst) or 1.0
        low, high = (worst - margin, best + margin) if maximize else (best - margin, worst + margin)
        ax.set_ylim(low, high)
        ax.text(0.01, 0.01, "axis cut at the worst 10%", transform=ax.transAxes, fontsize=7, color="gray")


def write_summary(study, cfg) -> str:
    from optuna.trial import TrialState

    text = summarize(study, cfg)
    write_file(os.path.join(cfg.study_dir, "summary.md"), text)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if done:
        best = (max if cfg.objective == "final" else min)(done, key=lambda t: t.value)
        write_file(os.path.join(cfg.study_dir, "best.json"), json.dumps(
            {"trial": best.number, "value": best.value, "worst_seed": best.user_attrs.get("worst"),
             "params": best.params, "flags": best.user_attrs.get("flags"),
             "command": best.user_attrs.get("command"), "seeds": best.user_attrs.get("seeds")}, indent=1))
        try:
            plot_history(study, cfg, os.path.join(cfg.study_dir, "history.png"))
        except ImportError:
            print("matplotlib is missing: no history.png (pip install -r benchmark/requirements.txt)")
    return text


def write_file(path: str, text: str) -> None:
    """Atomically: several workers may write the summary at once."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# 4. The command line: the configuration, the study, the workers, Ctrl-C
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    script: str
    fixed_flags: list
    base: object  # the script's Args with the fixed flags
    space: dict
    objective: str
    target: Optional[float]
    seeds: list
    trials: int
    workers: int
    eval_every_steps: int
    periodic_eval_episodes: int
    study_name: str
    study_dir: str
    max_failures: int
    heartbeat: float
    stale_after: float
    top: int

    @property
    def total_timesteps(self) -> int:
        return self.base.total_timesteps

    def eval_every_iters(self, flags: list[str]) -> int:
        import tyro

        args = tyro.cli(type(self.base), args=flags)
        return max(1, round(self.eval_every_steps / args.batch_size))

    def identity(self) -> dict:
        """What must not change when a study is continued."""
        return {"script": self.script, "fixed_flags": self.fixed_flags, "objective": self.objective,
                "target": self.target, "seeds": self.seeds, "eval_every_steps": self.eval_every_steps,
                "periodic_eval_episodes": self.periodic_eval_episodes,
                "space": {k: dataclasses.asdict(v) for k, v in self.space.items()}}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any other flag is the script's, given to every trial (and no longer searched).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("script", choices=["ppo_discrete", "ppo_continuous"])
    parser.add_argument("--trials", type=int, default=20, help="complete + pruned trials the study should hold")
    parser.add_argument("--workers", type=int, default=1, help="trials at once in this process (one process each)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per trial (1, 2, ...), run one after the other")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="final",
                        help="final: the final evaluation; steps/time: env steps/wall seconds to reach --target")
    parser.add_argument("--target", type=float, help="a return to reach (needed by --objective steps/time)")
    parser.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                        help="override one entry of the search space (see SPACE in this file); repeatable")
    parser.add_argument("--eval-every-steps", type=int, help="periodic evaluation about this often "
                        "(default: a tenth of --total-timesteps)")
    parser.add_argument("--periodic-eval-episodes", type=int, default=10)
    parser.add_argument("--pruner", choices=["median", "none"], default="median")
    parser.add_argument("--prune-after", type=float, default=0.2,
                        help="no pruning in the first this fraction of the first seed's steps")
    parser.add_argument("--startup-trials", type=int, default=5,
                        help="trials sampled at random before TPE, and before pruning starts")
    parser.add_argument("--no-defaults-first", action="store_true",
                        help="do not enqueue the script's defaults as the study's first trial")
    parser.add_argument("--sampler-seed", type=int)
    parser.add_argument("--study", help="study name (default: SCRIPT-ENV_ID)")
    parser.add_argument("--study-dir", help="default: benchmark/studies/STUDY")
    parser.add_argument("--storage", help="an RDB URL (sqlite:///f.db, postgresql://...) or a journal file path "
                        "(default: STUDY_DIR/journal.log)")
    parser.add_argument("--max-failures", type=int, default=5, help="stop after this many failed trials here")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a trial's heartbeats")
    parser.add_argument("--stale-after", type=float, default=300.0,
                        help="a running trial with no heartbeat for this long is marked failed")
    parser.add_argument("--top", type=int, default=5, help="trials listed in the summary")
    return parser.parse_known_args(argv)


def make_config(opts, script_flags: list[str]) -> Config:
    """The configuration, or ValueError with what is wrong."""
    given = {tok[2:].split("=")[0].replace("-", "_").removeprefix("no_") for tok in script_flags if tok.startswith("--")}
    if given & RESERVED:
        raise ValueError(f"--{sorted(given & RESERVED)[0].replace('_', '-')} is set by the tuner for each trial")
    if opts.objective != "final" and opts.target is None:
        raise ValueError(f"--objective {opts.objective} needs --target")
    for name, value in (("--trials", opts.trials + 1), ("--workers", opts.workers), ("--seeds", opts.seeds),
                        ("--max-failures", opts.max_failures), ("--periodic-eval-episodes", opts.periodic_eval_episodes)):
        if value < 1:
            raise ValueError(f"{name} must be positive")
    sys.path.insert(0, ROOT)
    import tyro

    module = importlib.import_module(opts.script)
    try:
        base = tyro.cli(module.Args, args=script_flags)
    except SystemExit:  # tyro printed what is wrong
        raise ValueError(f"the flags {' '.join(script_flags)} are not {opts.script}.py's") from None
    fields = {f.name for f in dataclasses.fields(module.Args)} | {"minibatch_size"}
    specs = dict(SPACE)
    for item in opts.space:
        name, sep, spec = item.partition("=")
        if not sep or name not in fields or name in RESERVED:
            raise ValueError(f"--space {item}: expected NAME=SPEC with NAME a hyperparameter of {opts.script}.py")
        specs[name] = spec
    space, fixed = {}, list(script_flags)
    for name, spec in specs.items():
        value = parse_spec(name, spec)
        given_here = name in given or (name == "minibatch_size" and "num_minibatches" in given)
        if given_here:
            continue  # a flag given to the script wins over the search
        if isinstance(value, Param):
            space[name] = value
        elif name == "minibatch_size":
            fixed += flag_text("num_minibatches", max(1, base.batch_size // value))
        else:
            fixed += flag_text(name, value)
    base = tyro.cli(module.Args, args=fixed)
    name = opts.study or f"{opts.script}-{base.env_id}"
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"--study {name}: use letters, digits, '.', '-' and '_'")
    return Config(
        script=opts.script, fixed_flags=fixed, base=base, space=space, objective=opts.objective, target=opts.target,
        seeds=list(range(1, opts.seeds + 1)), trials=opts.trials, workers=opts.workers,
        eval_every_steps=opts.eval_every_steps or max(1, base.total_timesteps // 10),
        periodic_eval_episodes=opts.periodic_eval_episodes, study_name=name,
        study_dir=os.path.abspath(opts.study_dir or os.path.join(HERE, "studies", name)),
        max_failures=opts.max_failures, heartbeat=opts.heartbeat, stale_after=opts.stale_after, top=opts.top)


def open_study(opts, cfg: Config):
    """Create the study, or load it and check that it is the same search."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    name = cfg.study_name
    if opts.storage and "://" in opts.storage:
        storage = optuna.storages.RDBStorage(opts.storage)
    else:
        path = os.path.abspath(opts.storage or os.path.join(cfg.study_dir, "journal.log"))
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    pruner = optuna.pruners.NopPruner() if opts.pruner == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=opts.startup_trials, n_warmup_steps=int(opts.prune_after * cfg.total_timesteps))
    sampler = optuna.samplers.TPESampler(n_startup_trials=opts.startup_trials, seed=opts.sampler_seed)
    lock = JournalFileOpenLock(os.path.join(cfg.study_dir, "budget"))
    lock.acquire()
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction="maximize" if cfg.objective == "final" else "minimize",
                                    load_if_exists=True)
        identity = json.loads(json.dumps(cfg.identity()))
        saved = study.user_attrs.get("tuner")
        if saved is None:
            study.set_user_attr("tuner", identity)
            defaults = {n: getattr(cfg.base, n) for n in cfg.space if n != "minibatch_size"}
            if "minibatch_size" in cfg.space:
                defaults["minibatch_size"] = cfg.base.minibatch_size
            defaults = {n: v for n, v in defaults.items() if fits(cfg.space[n], v)}
            if defaults and not opts.no_defaults_first:
                study.enqueue_trial(defaults)
        elif saved != identity:
            diff = sorted(k for k in identity if saved.get(k) != identity[k])
            raise ValueError(f"study {name} in {opts.storage or cfg.study_dir} was started with other settings "
                             f"({', '.join(diff)}): {json.dumps({k: saved.get(k) for k in diff})}; "
                             "give the same ones, or another --study")
    finally:
        lock.release()
    return study


def main(argv: Optional[list[str]] = None) -> int:
    opts, script_flags = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = make_config(opts, script_flags)
        os.makedirs(os.path.join(cfg.study_dir, "logs"), exist_ok=True)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = open_study(opts, cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held = len(study.get_trials(deepcopy=False))
    print(f"study {study.study_name} in {cfg.study_dir} ({held} trials so far): "
          + (f"{cfg.trials} trials, {cfg.workers} at a time here, seeds {cfg.seeds}, searching "
             f"{', '.join(cfg.space) or 'nothing'}" if cfg.trials else "the summary only"), flush=True)

    tuner = Tuner(cfg, study)
    received = []

    def on_signal(signum, frame):
        if received:  # a second Ctrl-C: stop at once; the running trials are failed at the next start
            for proc in list(tuner.procs):
                proc.kill()
            os._exit(128 + signum)
        received.append(signum)
        print("\nstopping: the running trials are recorded as failed; run the same command to continue",
              file=sys.stderr, flush=True)
        tuner.interrupt()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=tuner.worker_loop, daemon=True) for _ in range(cfg.workers)]
    threading.Thread(target=tuner.heartbeat, daemon=True).start()
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    finally:
        tuner.stop.set()
        for s, handler in old.items():
            signal.signal(s, handler)
    print(write_summary(study, cfg), flush=True)
    print(f"written: {os.path.join(cfg.study_dir, 'summary.md')}", flush=True)
    if received:
        return 128 + received[0]
    if tuner.failures >= cfg.max_failures:
        print(f"error: stopped after {tuner.failures} failed trials (see {os.path.join(cfg.study_dir, 'logs')})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter search for ppo_discrete.py or ppo_continuous.py with Optuna (issues 11, 20).

    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 20 --total-timesteps 100000
    python benchmark/tune.py ppo_discrete --trials 40 --seeds 3 --objective worst --score mean-std \\
        --total-timesteps 400000 --also-no-compile --space gamma=0.99,0.995,0.999
    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 0   # the summary only

A trial runs the script unchanged, as a subprocess (OMP_NUM_THREADS=1), once per seed, and reads
its periodic evaluations (--eval-every) as they come: Optuna's pruner stops a trial that falls
below the median. Optuna does the rest: its storages (a journal file by default, or an RDB URL for
many machines), TPE, the median pruner, study.optimize with its heartbeat, fail_stale_trials and
RetryHeartbeatStaleTrialCallback for dead workers, MaxTrialsCallback for the budget, the
trials_dataframe and the matplotlib plots. See benchmark/TUNING.md for what this file adds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import random
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
import warnings

try:
    import optuna
    from optuna.trial import TrialState
except ImportError:  # main() says what to install
    optuna = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# 1. The search space: a name is a field of the script's Args (or minibatch_size, which becomes
#    --num-minibatches). SPEC: "log:LOW:HIGH", "float:LOW:HIGH", "int:LOW:HIGH", "A,B,C" (a choice)
#    or one value (fixed). Override an entry with --space NAME=SPEC.
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
RESERVED = {"seed", "eval_every", "periodic_eval_episodes", "runs_dir", "exp_name", "print_every",
            "resume", "eval_checkpoint"}  # set by the tuner on every trial, or not for a trial
EVAL_LINE = re.compile(r"eval at step ([\d,]+): (\S+) \+/- (\S+) over \d+ episodes")
# Started through this, a trial gets SIGTERM (and saves, and exits) when the tuner dies, even by
# SIGKILL: Linux's PR_SET_PDEATHSIG, kept across exec; elsewhere the script just runs.
LAUNCH = ("import ctypes, os, sys\ntry: ctypes.CDLL(None).prctl(1, 15)\nexcept (AttributeError, OSError): pass\n"
          "if os.getppid() != int(sys.argv[1]): sys.exit(143)\nos.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str  # log, float, int, choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()


def parse_value(text: str):
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(name: str, spec: str):
    """A Param for a searched entry, or the value of a fixed one; ValueError if malformed."""
    kind, _, rest = spec.partition(":")
    if kind in ("log", "float", "int"):
        try:
            low, high = (int(x) if kind == "int" else float(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"--space {name}={spec}: expected {kind}:LOW:HIGH with two numbers") from None
        if not low < high or (kind == "log" and low <= 0) or not math.isfinite(high - low):
            raise ValueError(f"--space {name}={spec}: need finite LOW < HIGH (and LOW > 0 for log)")
        return Param(kind, low, high)
    values = tuple(parse_value(v) for v in spec.split(","))
    return values[0] if len(values) == 1 else Param("choice", choices=values)


def flag_text(name: str, value) -> list[str]:
    name = name.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", f"{value:.4g}" if isinstance(value, float) else str(value)]


def param_flags(params: dict, base) -> list[str]:
    """The script flags for one trial's hyperparameters; base: the Args of the fixed flags."""
    flags = [tok for name, value in params.items() if name != "minibatch_size" for tok in flag_text(name, value)]
    if "minibatch_size" in params:
        batch = params.get("num_envs", base.num_envs) * params.get("num_steps", base.num_steps)
        count = max(1, batch // params["minibatch_size"])
        while batch % count:  # equal minibatches, as the script requires
            count -= 1
        flags += flag_text("num_minibatches", count)
    return flags


class Pruned(Exception):
    pass


class Failed(Exception):
    pass


class Interrupted(Exception):
    pass


# 2. The storages: Optuna's, with the two things the journal file lacks in Optuna 5.0
def journal_storage(path: str, heartbeat: int, grace: int, retry):
    """Optuna's JournalStorage on Optuna's JournalFileBackend, plus Optuna's heartbeat interface
    (RDB-only in 5.0, optuna/optuna#6615), so that study.optimize beats and fails stale trials here too."""
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    class Backend(JournalFileBackend):
        """An append that fails (a full disk) is cut back, and a cut last line (a writer killed
        mid-line), which reading skips, is dropped before the next append: one bad write never
        glues onto a good line and makes the rest of the file unreadable."""

        def append_logs(self, logs):
            text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
            self._lock.acquire()
            try:
                with open(self._file_path, "r+b") as f:
                    keep = end = f.seek(0, os.SEEK_END)
                    while keep and not (f.seek(keep - 1) or f.read(1) == b"\n"):
                        keep -= 1  # back to the end of the last whole line (a cut one is short)
                    try:
                        f.truncate(keep) if keep < end else None
                        f.seek(keep)
                        f.write(text)
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError:
                        f.truncate(keep)
                        raise
            finally:
                self._lock.release()

    class Storage(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, OSError):  # ended meanwhile; a full disk shows elsewhere
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                    if now - (t.system_attrs.get("heartbeat") or t.datetime_start.timestamp()) > grace]

        def get_heartbeat_interval(self) -> int:
            return heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return retry

    return Storage(Backend(path, lock_obj=JournalFileOpenLock(path)))


def rdb_storage(url: str, heartbeat: int, grace: int, retry, create: bool = True):
    """Optuna's RDBStorage. Workers that start together on a new database race to create its tables
    (DuplicateTable, or a unique violation; optuna/optuna#1092): the losers try again, and find them."""
    import sqlalchemy.exc

    for attempt in range(20):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                              heartbeat_stale_trial_callback=retry, skip_table_creation=not create)
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError):
            if attempt == 19 or not create:
                raise
            time.sleep(0.1 + 0.4 * random.random())


# 3. The trials: one run of the script read line by line, the objective over the runs
class Tuner:
    def __init__(self, cfg, study):
        self.cfg, self.study = cfg, study
        self.stop = threading.Event()  # Ctrl-C or SIGTERM: end the running trials
        self.lock = threading.Lock()
        self.procs: set = set()
        self.failures, self.taken_over = 0, None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def command(self, flags: list[str], trial_number: int) -> list[str]:
        cfg = self.cfg
        return [os.path.join(ROOT, f"{cfg.script}.py"), *flags, "--eval-every", str(cfg.eval_every_iters(flags)),
                "--periodic-eval-episodes", str(cfg.periodic_eval_episodes), "--runs-dir",
                os.path.join(cfg.study_dir, "runs"), "--exp-name", f"trial{trial_number}", "--print-every", "60"]

    def run_once(self, trial, flags: list[str], extra: tuple, index: int) -> dict:
        """One run of the script (one seed, compiled or not); reports its evaluations, stops it on
        pruning, on reaching the target (steps/time objectives) or on Ctrl-C."""
        cfg = self.cfg
        cmd = self.command(flags + list(extra), trial.number)
        log_path = os.path.join(cfg.study_dir, "logs", f"trial{trial.number:04d}_run{index}.log")
        best = solved = solved_s = stopped_for = run_dir = None
        tail, reported, last_step, start = [], set(), 0, time.perf_counter()
        with self.lock:
            if self.stop.is_set():
                raise Interrupted()
            proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(os.getpid()), *cmd], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            self.procs.add(proc)
        try:
            with open(log_path, "w") as log:
                log.write(shlex.join(["python", *cmd]) + "\n")
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-5:]
                    if line.startswith("run dir: "):
                        run_dir = line[len("run dir: "):].strip()
                    if not (match := EVAL_LINE.match(line)) or stopped_for:
                        continue
                    last_step = int(match[1].replace(",", ""))
                    score = float(match[2]) - (float(match[3]) if cfg.score == "mean-std" else 0.0)
                    best = score if best is None or score > best else best
                    if cfg.target is not None and score >= cfg.target and solved is None:
                        solved, solved_s = last_step, time.perf_counter() - start
                        stopped_for = "target" if cfg.objective in ("steps", "time") else None
                    grid = index * cfg.total_timesteps + round(last_step / cfg.eval_every_steps) * cfg.eval_every_steps
                    if grid not in reported and math.isfinite(score):  # one axis for every run of a trial
                        reported.add(grid)
                        trial.report(score if cfg.maximize else -score, grid)
                        stopped_for = stopped_for or ("prune" if trial.should_prune() else None)
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
            raise Pruned(f"pruned at step {last_step:,} of run {index} ({best:.1f} at best)")
        # Ended by a signal (Ctrl-C reaches the script too): the handler may set `stop` a moment later.
        signalled = code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
        if stopped_for is None and code != 0 and self.stop.wait(2.0 if signalled else 0.0):
            raise Interrupted()
        run = {"label": " ".join(extra), "best": best, "solved_step": solved,
               "solved_seconds": solved_s, "wall": wall, "final": None, "std": None}
        if stopped_for == "target":
            return {**run, "value": float(solved if cfg.objective == "steps" else solved_s), "steps": last_step}
        if code == 1 and any("diverged" in line for line in tail):
            raise Pruned(f"diverged (run {index}): {tail[-1]}")
        if code != 0 or run_dir is None:
            raise Failed(f"run {index} exited with code {code}: {tail[-1] if tail else 'no output'} (log: {log_path})")
        with open(os.path.join(run_dir, "evaluation.json")) as f:
            evaluation = json.load(f)
        if evaluation["mean"] is None:
            raise Failed(f"run {index}: the final evaluation is not finite")
        score = evaluation["mean"] - (evaluation["std"] if cfg.score == "mean-std" else 0.0)
        run.update(final=evaluation["mean"], std=evaluation["std"], steps=evaluation["global_step"])
        if cfg.maximize:
            return {**run, "value": score}
        penalty = 1 + max(0.0, cfg.target - max(best if best is not None else score, score)) / max(abs(cfg.target), 1.0)
        return {**run, "value": (run["steps"] if cfg.objective == "steps" else wall) * penalty}  # short of the target

    def run_trial(self, trial) -> float:
        cfg = self.cfg
        params = {}
        for name, p in cfg.space.items():
            if p.kind == "choice":
                params[name] = trial.suggest_categorical(name, list(p.choices))
            else:
                params[name] = (trial.suggest_int(name, p.low, p.high) if p.kind == "int" else
                                trial.suggest_float(name, p.low, p.high, log=p.kind == "log"))
        flags = cfg.fixed_flags + param_flags(params, cfg.base)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("command", shlex.join(["python", f"{cfg.script}.py", *flags, *cfg.runs[0]]))
        print(f"trial {trial.number} started: {' '.join(param_flags(params, cfg.base))}", flush=True)
        runs = []
        for index, extra in enumerate(cfg.runs):
            runs.append(self.run_once(trial, flags, extra, index))
            trial.set_user_attr("runs", runs)
        values = [r["value"] for r in runs]
        trial.set_user_attr("worst", min(values) if cfg.maximize else max(values))
        if self.study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
        return min(values) if cfg.objective == "worst" else statistics.mean(values)

    def objective(self, trial) -> float:
        """run_trial, with the reason of a pruned or failed trial kept in its user attributes."""
        try:
            return self.run_trial(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it: this one was paused
            self.taken_over = trial.number
            self.study.stop()
            raise
        except Pruned as e:
            trial.set_user_attr("reason", str(e))
            raise optuna.TrialPruned(str(e)) from None
        except Exception as e:
            trial.set_user_attr("reason", "interrupted" if isinstance(e, Interrupted) else
                                str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}")
            raise

    def after_trial(self, study, trial) -> None:
        """Optuna's callback: say how the trial ended; stop on Ctrl-C, on --max-failures or on the budget."""
        reason = trial.user_attrs.get("reason", "")
        if trial.state == TrialState.COMPLETE:
            print(f"trial {trial.number} complete: {trial.value:,.1f} (worst run {trial.user_attrs['worst']:,.1f}) "
                  f"in {trial.duration.total_seconds():.0f} s", flush=True)
        else:
            self.failures += trial.state == TrialState.FAIL and reason != "interrupted"
            print(f"trial {trial.number} {trial.state.name.lower()}: {reason}", flush=True)
        if self.stop.is_set() or self.failures >= self.cfg.max_failures:
            study.stop()
        else:  # finished and running trials: a worker never starts one more than the budget needs
            optuna.study.MaxTrialsCallback(self.cfg.trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))(study, trial)

    def run(self) -> None:
        """study.optimize until the study holds --trials finished trials. When the budget is all
        finished or running, wait for the running ones: they finish, or turn stale and are retried."""
        said = False
        while not self.stop.is_set() and self.failures < self.cfg.max_failures and self.taken_over is None:
            optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            room = self.cfg.trials - finished - sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= self.cfg.trials:
                return
            if room > 0:
                self.study.optimize(self.objective, n_jobs=min(self.cfg.workers, room), catch=(Exception,),
                                    callbacks=[self.after_trial])
            else:
                if not said:
                    print(f"waiting for the {self.cfg.trials - finished} trial(s) running elsewhere: they finish, "
                          f"or are failed after --stale-after {self.cfg.stale_after} s", flush=True)
                said = True
                self.stop.wait(self.cfg.heartbeat)

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


# 4. The summary: Optuna's trials_dataframe and plots, and the command that reproduces the best
def summarize(study, cfg) -> str:
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    lines = [f"# Study {study.study_name}", "", f"Script {cfg.script}.py, fixed flags `{shlex.join(cfg.fixed_flags)}`, "
             f"runs per trial: {'; '.join(' '.join(r) for r in cfg.runs)}; objective: {cfg.objective} of the runs' "
             f"{cfg.score}" + (f", target {cfg.target:g}" if cfg.target is not None else "") + ".", "",
             f"Trials: {len(df)} (" + ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in
                                                 ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"))
             + f"). Written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    done = df[df["state"] == "COMPLETE"].sort_values("value", ascending=not cfg.maximize) if len(df) else df
    if not len(done):
        return "\n".join(lines + ["No complete trial yet."])
    lines += [f"## The best {min(cfg.top, len(done))} trials", "", "| trial | value | worst run | runs | "
              + " | ".join(cfg.space) + " |", "|---:|---:|---:|---|" + "---:|" * len(cfg.space)]
    for _, row in done.head(cfg.top).iterrows():
        runs = "; ".join(f"{r['label']}: " + (f"{r['final']:.1f} +/- {r['std']:.1f}" if r["final"] is not None else
                                               "stopped at the target") + (f", >= target at {r['solved_step']:,}"
                                                                           if r["solved_step"] is not None else "")
                         for r in row["user_attrs_runs"])
        values = [row.get(f"params_{n}") for n in cfg.space]
        lines.append(f"| {row['number']} | {row['value']:,.1f} | {row['user_attrs_worst']:,.1f} | {runs} | " + " | ".join(
            "" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |")
    best = study.best_trial
    return "\n".join(lines + ["", f"Best: trial {best.number}, {best.value:,.1f}. Reproduce it:", "", "```",
                              best.user_attrs["command"], "```", ""])


def write_summary(study, cfg) -> str:
    text = summarize(study, cfg)
    write_file(os.path.join(cfg.study_dir, "summary.md"), text + "\n")
    write_file(os.path.join(cfg.study_dir, "trials.csv"), study.trials_dataframe().to_csv(index=False))
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        write_file(os.path.join(cfg.study_dir, "best.json"), json.dumps(
            {"trial": best.number, "value": best.value, "params": best.params, **best.user_attrs}, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

        for name, plot in (("history.png", plot_optimization_history), ("evaluations.png", plot_intermediate_values)):
            ax = plot(study)
            if ax.get_legend() is not None and name == "evaluations.png":
                ax.get_legend().remove()  # one entry per trial
            ax.figure.savefig(os.path.join(cfg.study_dir, name), dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
    return text


def write_file(path: str, text: str) -> None:
    """Atomically: several workers may write the summary at once."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# 5. The command line: the configuration, checked before anything is written; the study; Ctrl-C
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (python benchmark/tune.py --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]):
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               epilog="Any other flag is the script's, given to every trial (and no longer searched).")
    p.add_argument("script", choices=["ppo_discrete", "ppo_continuous"])
    p.add_argument("--trials", type=int, default=20, help="finished (complete + pruned) trials the study should hold")
    p.add_argument("--workers", type=int, default=1, help="trials at once in this process (one process each)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per trial (1, 2, ...), run one after the other")
    p.add_argument("--objective", choices=["final", "worst", "steps", "time"], default="final",
                   help="final/worst: the mean/worst over the runs of the final evaluation's score (maximized); "
                   "steps/time: env steps/wall seconds to a periodic score >= --target (minimized)")
    p.add_argument("--score", choices=["mean", "mean-std"], default="mean",
                   help="an evaluation's score: its mean return, or mean minus std")
    p.add_argument("--target", type=float, help="a score to reach (needed by --objective steps/time)")
    p.add_argument("--also-no-compile", action="store_true", help="run every seed a second time with --no-compile")
    p.add_argument("--space", action="append", default=[], metavar="NAME=SPEC", help="override an entry of SPACE")
    p.add_argument("--eval-every-steps", type=int, help="periodic evaluation this often (default: a tenth of the run)")
    p.add_argument("--periodic-eval-episodes", type=int, default=10)
    p.add_argument("--pruner", choices=["median", "none"], default="median")
    p.add_argument("--prune-after", type=float, default=0.2, help="no pruning in this fraction of the first run")
    p.add_argument("--startup-trials", type=int, default=5, help="random trials before TPE, and before pruning")
    p.add_argument("--no-defaults-first", action="store_true", help="do not run the script's defaults first")
    p.add_argument("--sampler-seed", type=int)
    p.add_argument("--study", help="study name (default: SCRIPT-ENV_ID)")
    p.add_argument("--study-dir", help="default: benchmark/studies/STUDY")
    p.add_argument("--storage", help="a journal file (default: STUDY_DIR/journal.log) or an RDB URL (postgresql://...)")
    p.add_argument("--max-failures", type=int, default=5, help="stop after this many failed trials here")
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    p.add_argument("--stale-after", type=int, default=300, help="a running trial silent this long is failed (retried once)")
    p.add_argument("--top", type=int, default=5, help="trials listed in the summary")
    return p.parse_known_args(argv)


def script_args(module, flags: list[str]):
    """The script's Args for these flags, or ValueError in one line (tyro's message is a box)."""
    import tyro

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        with contextlib.suppress(SystemExit):
            return tyro.cli(module.Args, args=flags)
    names = {f.name for f in dataclasses.fields(module.Args)}
    unknown = [t for t in flags if t.startswith("--") and t[2:].split("=")[0].replace("-", "_") not in names
               and t[5:].split("=")[0].replace("-", "_") not in names]
    script = module.__name__
    raise ValueError(f"{script}.py has no flag {unknown[0]}" if unknown else
                     f"{script}.py refuses {shlex.join(flags)} (python {script}.py --help)")


def make_config(opts, flags: list[str]):
    """opts completed with the fixed flags, the space and the runs; ValueError with what is wrong."""
    for name in ("trials", "startup_trials", "workers", "seeds", "max_failures", "periodic_eval_episodes", "heartbeat",
                 "top", "eval_every_steps"):
        if (value := getattr(opts, name)) is not None and value < (0 if name in ("trials", "startup_trials") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'0 or more' if value < 0 else 'positive'}, got {value}")
    if opts.stale_after <= opts.heartbeat:
        raise ValueError(f"--stale-after ({opts.stale_after} s) must be longer than --heartbeat ({opts.heartbeat} s)")
    if not 0 <= opts.prune_after <= 1:
        raise ValueError(f"--prune-after must lie in [0, 1], got {opts.prune_after}")
    if opts.target is not None and not math.isfinite(opts.target):
        raise ValueError(f"--target must be a finite number, got {opts.target}")
    if opts.objective in ("steps", "time") and opts.target is None:
        raise ValueError(f"--objective {opts.objective} needs --target")
    given = {t[2:].split("=")[0].replace("-", "_").removeprefix("no_") for t in flags if t.startswith("--")}
    if given & RESERVED:
        raise ValueError(f"--{sorted(given & RESERVED)[0].replace('_', '-')} is set by the tuner for each trial")
    if opts.also_no_compile and "compile" in given:
        raise ValueError("--also-no-compile runs the script's default and --no-compile: leave --compile out")
    sys.path.insert(0, ROOT)
    module = importlib.import_module(opts.script)
    base = script_args(module, flags)
    fields = {f.name for f in dataclasses.fields(module.Args)} | {"minibatch_size"}
    specs = dict(SPACE)
    for item in opts.space:
        name, sep, spec = item.partition("=")
        if not sep or name not in fields or name in RESERVED:
            raise ValueError(f"--space {item}: expected NAME=SPEC with NAME a hyperparameter of {opts.script}.py")
        specs[name] = spec
    opts.space, opts.fixed_flags = {}, list(flags)
    for name, spec in specs.items():
        value = parse_spec(name, spec)
        if name in given or (name == "minibatch_size" and "num_minibatches" in given):
            continue  # a flag given to the script wins over the search
        if isinstance(value, Param):
            opts.space[name] = value
        else:
            opts.fixed_flags += param_flags({name: value}, base)
    opts.base = base = script_args(module, opts.fixed_flags)
    if error := module.check_args(base) or module.check_env(base.env_id):
        raise ValueError(f"{opts.script}.py: {error}")
    for name, p in opts.space.items():  # the ends of each range, and a value between, as the script takes them
        for value in p.choices or (p.low, p.high, p.low + (p.high - p.low) / 3 if p.kind != "int" else p.low):
            if error := module.check_args(script_args(module, opts.fixed_flags + param_flags({name: value}, base))):
                raise ValueError(f"--space {name}: {opts.script}.py refuses {value} ({error})")
    batch = math.prod(max(p.choices or (p.high,)) if (p := opts.space.get(n)) else getattr(base, n)
                      for n in ("num_envs", "num_steps"))
    if batch > base.total_timesteps:
        raise ValueError(f"the space allows batches of {batch:,} steps (--num-envs x --num-steps), more than "
                         f"--total-timesteps {base.total_timesteps:,}: raise it, or give --num-envs / --num-steps")
    opts.study = opts.study or f"{opts.script}-{base.env_id}"
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", opts.study):
        raise ValueError(f"--study {opts.study!r}: use letters, digits, '.', '-' and '_', starting with a letter or digit")
    opts.study_dir = os.path.abspath(opts.study_dir or os.path.join(HERE, "studies", opts.study))
    if "://" not in (opts.storage or ""):
        opts.storage = os.path.abspath(opts.storage or os.path.join(opts.study_dir, "journal.log"))
        if opts.storage != os.path.join(opts.study_dir, "journal.log") and not os.path.isdir(os.path.dirname(opts.storage)):
            raise ValueError(f"--storage {opts.storage}: its folder does not exist")
        if os.path.isdir(opts.storage):
            raise ValueError(f"--storage {opts.storage} is a folder: give a file path, or an RDB URL")
    opts.runs = [("--seed", str(s), *x) for x in ([], ["--no-compile"])[:1 + opts.also_no_compile]
                 for s in range(1, opts.seeds + 1)]
    opts.maximize, opts.total_timesteps = opts.objective in ("final", "worst"), base.total_timesteps
    opts.eval_every_steps = opts.eval_every_steps or max(1, base.total_timesteps // 10)
    opts.eval_every_iters = lambda f: max(1, round(opts.eval_every_steps / script_args(module, f).batch_size))
    return opts


def identity(cfg) -> dict:
    """What must not change when a study is continued."""
    keys = ("script", "fixed_flags", "objective", "score", "target", "runs", "eval_every_steps", "periodic_eval_episodes")
    return json.loads(json.dumps({**{k: getattr(cfg, k) for k in keys},
                                  "space": {k: dataclasses.asdict(v) for k, v in cfg.space.items()}}))


def open_study(cfg, create: bool = True):
    """Create the study (the creator enqueues the script's defaults), or load it and check it is the same search."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    if "://" in cfg.storage:
        storage = rdb_storage(cfg.storage, cfg.heartbeat, cfg.stale_after, retry, create)
    else:
        storage = journal_storage(cfg.storage, cfg.heartbeat, cfg.stale_after, retry)
    kw = dict(study_name=cfg.study, storage=storage, sampler=optuna.samplers.TPESampler(
        n_startup_trials=cfg.startup_trials, seed=cfg.sampler_seed), pruner=optuna.pruners.NopPruner()
        if cfg.pruner == "none" else optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials, n_warmup_steps=int(cfg.prune_after * cfg.total_timesteps)))
    try:
        if not create:
            raise optuna.exceptions.DuplicatedStudyError()
        study = optuna.create_study(direction="maximize" if cfg.maximize else "minimize", **kw)
    except optuna.exceptions.DuplicatedStudyError:
        try:
            study = optuna.load_study(**kw)
        except KeyError:
            raise ValueError(f"no study {cfg.study} in {cfg.storage}: nothing to summarize") from None
        for _ in range(50):  # its creator is setting it up
            if (saved := study.user_attrs.get("tuner")) is not None or not create:
                break
            time.sleep(0.1)
        if saved is not None and saved != identity(cfg):
            diff = sorted(k for k in saved if saved.get(k) != identity(cfg).get(k))
            raise ValueError(f"study {cfg.study} was started with other settings ({', '.join(diff)}): "
                             f"{json.dumps({k: saved.get(k) for k in diff})}; give the same ones, or another --study")
        if saved is not None or not create:
            return study
    study.set_user_attr("tuner", identity(cfg))
    defaults = {n: getattr(cfg.base, n) for n in cfg.space}
    if not cfg.no_defaults_first and all(p.low <= defaults[n] <= p.high if not p.choices else defaults[n] in p.choices
                                         for n, p in cfg.space.items()):
        study.enqueue_trial(defaults)
    return study


def storage_error(e: Exception) -> str | None:
    """One line for what the machine or the user can cause when opening a storage; None for a bug."""
    import sqlalchemy.exc

    if isinstance(e, ImportError):
        return "--storage: this URL's database driver is missing: pip install -r benchmark/requirements.txt"
    if isinstance(e, sqlalchemy.exc.ArgumentError):
        return f"--storage: not a database URL SQLAlchemy reads ({str(e).splitlines()[0]}), e.g. postgresql://user@host/db"
    if isinstance(e, sqlalchemy.exc.DBAPIError):
        return f"--storage: cannot open the database: {str(e.orig).strip().splitlines()[0]}"
    if isinstance(e, OSError):
        return f"cannot write the study's files: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    if optuna is None:
        print("error: the tuner needs optuna, pandas and matplotlib: pip install -r benchmark/requirements.txt",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    opts, flags = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = make_config(opts, flags)
        if cfg.trials == 0:  # the summary only: nothing is created or written
            if "://" not in cfg.storage and not os.path.isfile(cfg.storage):
                raise ValueError(f"no study at {cfg.storage}: nothing to summarize")
            print(summarize(open_study(cfg, create=False), cfg), flush=True)
            return 0
        os.makedirs(os.path.join(cfg.study_dir, "logs"), exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.study_dir).close()
        study = open_study(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (a storage that cannot be opened, a folder that cannot be written)
        if (message := storage_error(e)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"study {cfg.study} in {cfg.storage} ({len(study.trials)} trials so far): {cfg.trials} trials, {cfg.workers} "
          f"at a time here, runs {'; '.join(' '.join(r) for r in cfg.runs)}, searching {', '.join(cfg.space) or 'nothing'}",
          flush=True)
    tuner, received, code = Tuner(cfg, study), [], 0

    def on_signal(signum, frame):
        if received:  # a second Ctrl-C: at once; the running trials turn stale and are retried
            for proc in list(tuner.procs):
                proc.kill()
            os._exit(128 + signum)
        received.append(signum)
        print("\nstopping: the running trials are recorded as failed; run the same command to continue",
              file=sys.stderr, flush=True)
        tuner.interrupt()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        tuner.run()
    except Exception as e:  # noqa: BLE001
        if tuner.taken_over is None and not isinstance(e, OSError):
            raise
        print(f"error: trial {tuner.taken_over} was failed by another worker: this one was silent for more than "
              f"--stale-after {cfg.stale_after} s (paused?); it stops" if tuner.taken_over is not None else
              f"error: cannot write the study ({e}): free space and run the same command again", file=sys.stderr)
        code = 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    try:
        print(write_summary(study, cfg), f"\nwritten: {os.path.join(cfg.study_dir, 'summary.md')}", flush=True)
    except OSError as e:
        print(f"error: cannot write the summary in {cfg.study_dir} ({e})", file=sys.stderr)
        code = code or 1
    if received:
        return 128 + received[0]
    if tuner.failures >= cfg.max_failures:
        print(f"error: stopped after {tuner.failures} failed trials (see {os.path.join(cfg.study_dir, 'logs')})",
              file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter search for ppo_discrete.py or ppo_continuous.py with Optuna (issues 11, 20).

    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 20 --total-timesteps 100000
    python benchmark/tune.py ppo_discrete --trials 40 --seeds 3 --objective worst --score mean-std \\
        --also-no-compile --total-timesteps 400000 --space gamma=0.99,0.995,0.999
    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 0   # the summary only

A trial runs the script unchanged, as a subprocess per seed, and reads its periodic evaluations
(--eval-every) as they come, for Optuna's pruner. Optuna does the rest: the storage (a journal
file, or an RDB URL for many machines), TPE, the median pruner, study.optimize with its heartbeat,
fail_stale_trials and RetryHeartbeatStaleTrialCallback, MaxTrialsCallback, trials_dataframe and
the plots. benchmark/TUNING.md says what this file adds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
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
# The search space: each name is a field of the script's Args, or minibatch_size (which becomes
# --num-minibatches). SPEC: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, A,B,C (a choice) or one
# value (fixed). --space NAME=SPEC overrides an entry or adds one.
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
RESERVED = {"seed", "eval_every", "periodic_eval_episodes", "runs_dir", "exp_name", "print_every", "resume",
            "eval_checkpoint"}  # the tuner sets them, or they make no sense in a trial
EVAL_LINE = re.compile(r"eval at step ([\d,]+): (\S+) \+/- (\S+) over \d+ episodes")
# A trial starts through this, so that it gets SIGTERM (saves and exits) when the tuner dies, even
# by SIGKILL: Linux's PR_SET_PDEATHSIG, kept across exec. Elsewhere the script just runs.
LAUNCH = ("import ctypes, os, sys\ntry: ctypes.CDLL(None).prctl(1, 15)\nexcept (AttributeError, OSError): pass\n"
          "if os.getppid() != int(sys.argv[1]): sys.exit(143)\nos.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
Param = collections.namedtuple("Param", "kind low high choices", defaults=(0, 0, ()))  # kind: log float int choice
Pruned, Failed, Interrupted = (type(name, (Exception,), {}) for name in ("Pruned", "Failed", "Interrupted"))


def parse_spec(name: str, spec: str):
    """A Param for a searched entry, or the value of a fixed one; ValueError if malformed."""
    kind, _, rest = spec.partition(":")
    if kind in ("log", "float", "int"):
        try:
            low, high = (int(x) if kind == "int" else float(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"--space {name}={spec}: expected {kind}:LOW:HIGH") from None
        if not low < high or (kind == "log" and low <= 0) or not math.isfinite(high - low):
            raise ValueError(f"--space {name}={spec}: need finite LOW < HIGH (and LOW > 0 for log)")
        return Param(kind, low, high)
    values = tuple(map(parse_value, spec.split(",")))
    return values[0] if len(values) == 1 else Param("choice", choices=values)


def parse_value(text: str):
    with contextlib.suppress(ValueError):
        return json.loads(text)  # 3, 0.99, 1e-3, true
    return text


def flag_text(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{'' if value else 'no-'}{name.replace('_', '-')}"]
    return [f"--{name.replace('_', '-')}", f"{value:.4g}" if isinstance(value, float) else str(value)]


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


# ---- The storages: Optuna's, with what its journal file lacks in Optuna 5.0 ---------------------
def journal_storage(path: str, heartbeat: int, grace: int, retry):
    """Optuna's JournalStorage on its JournalFileBackend, with Optuna's heartbeat interface (RDB only
    in 5.0, optuna/optuna#6615): study.optimize then beats, and fail_stale_trials works, here too."""
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    class Backend(JournalFileBackend):
        """An append that fails (a full disk) is cut back, and a cut last line (a writer killed mid-line),
        which Optuna's reader skips, is dropped before the next append: glued onto a new line, it would
        make that line and every later one unreadable."""

        def append_logs(self, logs):
            text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
            self._lock.acquire()
            try:
                fd = os.open(self._file_path, os.O_RDWR)
                try:
                    end = os.lseek(fd, 0, os.SEEK_END)
                    while end and os.pread(fd, 1, end - 1) != b"\n":
                        end -= 1
                    try:
                        os.ftruncate(fd, end)
                        done = 0
                        while done < len(text):
                            done += os.pwrite(fd, text[done:], end + done)
                        os.fsync(fd)
                    except OSError:
                        os.ftruncate(fd, end)
                        raise
                finally:
                    os.close(fd)
            finally:
                self._lock.release()

    class Storage(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:  # a finished trial, a full disk: told elsewhere
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, OSError):
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            return [t._trial_id for t in self.get_all_trials(study_id, False, states=(TrialState.RUNNING,))
                    if time.time() - max(t.system_attrs.get("heartbeat", 0), t.datetime_start.timestamp()) > grace]

        def get_heartbeat_interval(self) -> int:
            return heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return retry

    return Storage(Backend(path, lock_obj=JournalFileOpenLock(path)))


def rdb_storage(url: str, heartbeat: int, grace: int, retry, create: bool = True):
    """Optuna's RDBStorage. Workers started together on a new database race to create its tables
    (DuplicateTable, or a unique violation; optuna/optuna#1092): the losers try again and find them."""
    import sqlalchemy.exc

    for attempt in range(20):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                              heartbeat_stale_trial_callback=retry, skip_table_creation=not create)
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError):
            if attempt == 19 or not create:
                raise
            time.sleep(0.1 + 0.4 * random.random())
        except ValueError as e:  # a port that is not a number, ...
            raise ValueError(f"--storage: not a database URL ({e})") from None


# ---- The trials -------------------------------------------------------------------------------
class Tuner:
    def __init__(self, cfg, study):
        self.cfg, self.study, self.procs = cfg, study, set()
        self.stop, self.lock = threading.Event(), threading.Lock()  # stop: Ctrl-C or SIGTERM
        self.failures, self.taken_over, self.write_error = 0, None, None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def command(self, flags: list[str], number: int) -> list[str]:
        cfg = self.cfg
        every = max(1, round(cfg.eval_every_steps / script_args(cfg.module, flags).batch_size))
        return [os.path.join(ROOT, f"{cfg.script}.py"), *flags, "--eval-every", str(every), "--periodic-eval-episodes",
                str(cfg.periodic_eval_episodes), "--runs-dir", os.path.join(cfg.study_dir, "runs"),
                "--exp-name", f"trial{number}", "--print-every", "60"]

    def run_once(self, trial, flags: list[str], extra: tuple, index: int, reported: set) -> dict:
        """One run of the script (a seed, compiled or not): reports its periodic scores, and stops it
        (SIGTERM: it saves and exits) when the pruner says so."""
        cfg, cmd, start = self.cfg, self.command(flags + list(extra), trial.number), time.perf_counter()
        log_path = os.path.join(cfg.study_dir, "logs", f"trial{trial.number:04d}_run{index}.log")
        best = pruned = run_dir = None
        tail = []
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
                    run_dir = line[9:].strip() if line.startswith("run dir: ") else run_dir
                    if not (match := EVAL_LINE.match(line)) or pruned:
                        continue
                    step, score = int(match[1].replace(",", "")), float(match[2]) - (cfg.score == "mean-std") * float(match[3])
                    best = score if best is None or score > best else best
                    # One axis for the runs of a trial (run k from k x total), on the --eval-every-steps
                    # grid, so that the pruner compares trials with other batch sizes at the same steps.
                    grid = index * cfg.total_timesteps + round(step / cfg.eval_every_steps) * cfg.eval_every_steps
                    if math.isfinite(score) and grid not in reported:
                        reported.add(grid)
                        trial.report(score, grid)
                        if trial.should_prune():
                            pruned = f"pruned at step {step:,} of run {index} ({best:.1f} at best)"
                            proc.send_signal(signal.SIGTERM)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            with self.lock:
                self.procs.discard(proc)
        if pruned:
            raise Pruned(pruned)
        # Ended by a signal (Ctrl-C reaches the script too): the handler may set `stop` a moment later.
        signalled = code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
        if code != 0 and self.stop.wait(2.0 if signalled else 0.0):
            raise Interrupted()
        if code == 1 and any("diverged" in line for line in tail):
            raise Pruned(f"diverged (run {index}): {tail[-1]}")
        if code != 0 or run_dir is None:
            raise Failed(f"run {index} exited with code {code}: {tail[-1] if tail else 'no output'} (log: {log_path})")
        with open(os.path.join(run_dir, "evaluation.json")) as f:
            final = json.load(f)
        if final["mean"] is None or final["std"] is None:
            raise Failed(f"run {index}: the final evaluation is not finite")
        return {"label": " ".join(extra), "final": final["mean"], "std": final["std"],
                "wall": time.perf_counter() - start, "value": final["mean"] - (cfg.score == "mean-std") * final["std"]}

    def run_trial(self, trial) -> float:
        cfg, runs, reported = self.cfg, [], set()
        params = {name: trial.suggest_categorical(name, list(p.choices)) if p.kind == "choice" else
                  trial.suggest_int(name, p.low, p.high) if p.kind == "int" else
                  trial.suggest_float(name, p.low, p.high, log=p.kind == "log") for name, p in cfg.space.items()}
        flags = cfg.fixed_flags + param_flags(params, cfg.base)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("command", shlex.join(["python", f"{cfg.script}.py", *flags, *cfg.runs[0]]))
        print(f"trial {trial.number} started: {' '.join(param_flags(params, cfg.base))}", flush=True)
        for index, extra in enumerate(cfg.runs):
            runs.append(self.run_once(trial, flags, extra, index, reported))
            trial.set_user_attr("runs", runs)
        values = [r["value"] for r in runs]
        trial.set_user_attr("worst", min(values))
        if self.study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
        return min(values) if cfg.objective == "worst" else sum(values) / len(values)

    def objective(self, trial) -> float:
        """run_trial, with the reason of a pruned or failed trial kept in its user attributes."""
        try:
            return self.run_trial(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it: this one was paused
            self.taken_over = trial.number
            self.study.stop()
            raise
        except Exception as e:
            try:
                trial.set_user_attr("reason", "interrupted" if isinstance(e, Interrupted) else str(e)
                                    if isinstance(e, (Failed, Pruned)) else f"{type(e).__name__}: {e}")
            except OSError as error:  # the storage cannot be written: stop (Optuna cannot tell either)
                self.write_error = error
                self.study.stop()
            if isinstance(e, Pruned):
                raise optuna.TrialPruned(str(e)) from None
            raise

    def after_trial(self, study, trial) -> None:
        """Optuna's callback: say how the trial ended; stop on Ctrl-C, --max-failures or the budget."""
        reason = trial.user_attrs.get("reason", "")
        if trial.state == TrialState.COMPLETE:
            print(f"trial {trial.number} complete: {trial.value:,.1f} (worst run {trial.user_attrs['worst']:,.1f}) "
                  f"in {trial.duration.total_seconds():.0f} s", flush=True)
        else:
            self.failures += trial.state == TrialState.FAIL and reason != "interrupted"
            print(f"trial {trial.number} {trial.state.name.lower()}: {reason}", flush=True)
        if self.stop.is_set() or self.failures >= self.cfg.max_failures:
            study.stop()
        else:  # finished and running trials: no worker starts a trial that the budget does not need
            states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            optuna.study.MaxTrialsCallback(self.cfg.trials, states=states)(study, trial)

    def run(self) -> None:
        """study.optimize until the study holds --trials finished trials. When the rest of the budget
        is running elsewhere, wait: those trials finish, or turn stale and are retried here."""
        said = False
        while not (self.stop.is_set() or self.failures >= self.cfg.max_failures or self.taken_over is not None
                   or self.write_error):
            optuna.storages.fail_stale_trials(self.study)
            states = [t.state for t in self.study.get_trials(deepcopy=False)]
            finished = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
            if finished >= self.cfg.trials:
                return
            if (room := self.cfg.trials - finished - states.count(TrialState.RUNNING)) > 0:
                self.study.optimize(self.objective, n_jobs=min(self.cfg.workers, room), catch=(Exception,),
                                    callbacks=[self.after_trial])
                continue
            if not said:
                print(f"waiting for the {self.cfg.trials - finished} trial(s) running elsewhere: they finish, or "
                      f"are failed after --stale-after {self.cfg.stale_after} s", flush=True)
            said = True
            self.stop.wait(self.cfg.heartbeat)

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


# ---- The summary: Optuna's trials_dataframe and plots, and the command of the best trial ---------
def summarize(study, cfg) -> str:
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    lines = [f"# Study {study.study_name}", "", f"`{cfg.script}.py {shlex.join(cfg.fixed_flags)}`, runs "
             f"{'; '.join(' '.join(r) for r in cfg.runs)}; objective: the {cfg.objective} over the runs of the final "
             f"evaluation's {cfg.score}.", "", f"Trials: {len(df)} (" + ", ".join(
                 f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"))
             + f"). Written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    done = df[df["state"] == "COMPLETE"].sort_values("value", ascending=False) if len(df) else df
    if not len(done):
        return "\n".join(lines + ["No complete trial yet."])
    lines += [f"## The best {min(cfg.top, len(done))} trials", "", "| trial | value | worst run | runs | "
              + " | ".join(cfg.space) + " |", "|---:|---:|---:|---|" + "---:|" * len(cfg.space)]
    for _, row in done.head(cfg.top).iterrows():
        runs = "; ".join(f"{r['label']}: {r['final']:.1f} +/- {r['std']:.1f}" for r in row["user_attrs_runs"])
        values = [row.get(f"params_{n}") for n in cfg.space]
        lines.append(f"| {row['number']} | {row['value']:,.1f} | {row['user_attrs_worst']:,.1f} | {runs} | " + " | ".join(
            "" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |")
    return "\n".join(lines + ["", f"Best: trial {study.best_trial.number}. Reproduce it:", "", "```",
                              study.best_trial.user_attrs["command"], "```", ""])


def write_summary(study, cfg) -> str:
    """summary.md, trials.csv (the trials_dataframe), best.json, history.png and evaluations.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

    text = summarize(study, cfg)
    files = {"summary.md": text, "trials.csv": study.trials_dataframe().to_csv(index=False)}
    if done := any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        files["best.json"] = json.dumps({"trial": best.number, "value": best.value, "params": best.params,
                                         **best.user_attrs}, indent=1)
    for name, content in files.items():  # atomically: several workers may write at once
        fd, tmp = tempfile.mkstemp(dir=cfg.study_dir, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(content + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, os.path.join(cfg.study_dir, name))
    for name, plot in (("history.png", plot_optimization_history), ("evaluations.png", plot_intermediate_values)):
        if done:
            ax = plot(study)
            if name == "evaluations.png" and ax.get_legend() is not None:
                ax.get_legend().remove()  # one entry per trial
            ax.figure.savefig(os.path.join(cfg.study_dir, name), dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
    return text


# ---- The command line: every check before anything is written; the study; Ctrl-C ---------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (python benchmark/tune.py --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]):
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               epilog="Any other flag is the script's, given to every trial (and no longer searched).")
    add = p.add_argument
    add("script", choices=["ppo_discrete", "ppo_continuous"])
    add("--trials", type=int, default=20, help="finished (complete + pruned) trials the study should hold")
    add("--workers", type=int, default=1, help="trials at once in this process (one process each)")
    add("--seeds", type=int, default=1, help="seeds per trial (1, 2, ...), run one after the other")
    add("--objective", choices=["mean", "worst"], default="mean", help="of the runs' scores (maximized)")
    add("--score", choices=["mean", "mean-std"], default="mean", help="of an evaluation: its mean return, or mean - std")
    add("--also-no-compile", action="store_true", help="run each seed a second time with --no-compile")
    add("--space", action="append", default=[], metavar="NAME=SPEC", help="override an entry of SPACE")
    add("--eval-every-steps", type=int, help="periodic evaluations this often (default: a tenth of the run)")
    add("--periodic-eval-episodes", type=int, default=10)
    add("--pruner", choices=["median", "none"], default="median")
    add("--prune-after", type=float, default=0.2, help="no pruning in this fraction of the first run")
    add("--startup-trials", type=int, default=5, help="random trials before TPE, and before pruning")
    add("--no-defaults-first", action="store_true", help="do not run the script's defaults first")
    add("--sampler-seed", type=int)
    add("--study", help="study name (default: SCRIPT-ENV_ID)")
    add("--study-dir", help="default: benchmark/studies/STUDY")
    add("--storage", help="a journal file (default: STUDY_DIR/journal.log) or an RDB URL (postgresql://...)")
    add("--max-failures", type=int, default=5, help="stop after this many failed trials here")
    add("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    add("--stale-after", type=int, default=300, help="a running trial silent this long is failed, and retried once")
    add("--top", type=int, default=5, help="trials listed in the summary")
    return p.parse_known_args(argv)


def script_args(module, flags: list[str]):
    """The script's Args for these flags, or ValueError in one line (tyro's message is a box)."""
    import tyro

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        with contextlib.suppress(SystemExit):
            return tyro.cli(module.RunArgs, args=flags)
    names = {f.replace("_", "-") for f in module.RunArgs.__dataclass_fields__}
    unknown = [t for t in flags if t.startswith("--") and not {t[2:].split("=")[0], t[5:].split("=")[0]} & names]
    raise ValueError(f"{module.__name__}.py has no flag {unknown[0]}" if unknown else
                     f"{module.__name__}.py refuses {shlex.join(flags)} (python {module.__name__}.py --help)")


def make_config(cfg, flags: list[str]):
    """The parsed flags, completed with the fixed flags, the space and the runs; ValueError if wrong."""
    for name in ("trials", "startup_trials", "workers", "seeds", "max_failures", "periodic_eval_episodes",
                 "heartbeat", "top", "eval_every_steps"):
        if (value := getattr(cfg, name)) is not None and value < (0 if name in ("trials", "startup_trials") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'0 or more' if value < 0 else 'positive'}, got {value}")
    if cfg.stale_after <= cfg.heartbeat:
        raise ValueError(f"--stale-after ({cfg.stale_after} s) must be longer than --heartbeat ({cfg.heartbeat} s)")
    if not 0 <= cfg.prune_after <= 1:
        raise ValueError(f"--prune-after must lie in [0, 1], got {cfg.prune_after}")
    given = {t[2:].split("=")[0].replace("-", "_").removeprefix("no_") for t in flags if t.startswith("--")}
    if reserved := sorted(given & (RESERVED | ({"compile"} if cfg.also_no_compile else set()))):
        raise ValueError(f"--{reserved[0].replace('_', '-')} is set by the tuner")
    sys.path.insert(0, ROOT)
    cfg.module = module = __import__(cfg.script)
    base, specs = script_args(module, flags), dict(SPACE)
    for item in cfg.space:
        name, sep, spec = item.partition("=")
        if not sep or name not in {*module.RunArgs.__dataclass_fields__, "minibatch_size"} - RESERVED:
            raise ValueError(f"--space {item}: expected NAME=SPEC with NAME a hyperparameter of {cfg.script}.py")
        specs[name] = spec
    cfg.space, cfg.fixed_flags = {}, list(flags)
    for name, spec in specs.items():
        value = parse_spec(name, spec)
        if name in given or (name == "minibatch_size" and "num_minibatches" in given):
            continue  # a flag given to the script wins over the search
        if isinstance(value, Param):
            cfg.space[name] = value
        else:
            cfg.fixed_flags += param_flags({name: value}, base)
    cfg.base = base = script_args(module, cfg.fixed_flags)
    if error := base.check() or module.check_env(base.env_id):
        raise ValueError(f"{cfg.script}.py: {error}")
    for name, p in cfg.space.items():  # the ends of each range, and a value between, as the script takes them
        for value in p.choices or (p.low, p.high, p.low if p.kind == "int" else p.low + (p.high - p.low) / 3):
            try:
                error = script_args(module, cfg.fixed_flags + param_flags({name: value}, base)).check()
            except ValueError:
                error = "not a value of its type"
            if error:
                raise ValueError(f"--space {name}: {cfg.script}.py refuses {value} ({error})")
    batch = math.prod(max(p.choices or (p.high,)) if (p := cfg.space.get(n)) else getattr(base, n)
                      for n in ("num_envs", "num_steps"))
    if batch > base.total_timesteps:
        raise ValueError(f"the space holds batches of {batch:,} steps (--num-envs x --num-steps), more than "
                         f"--total-timesteps {base.total_timesteps:,}: raise it, or give --num-envs / --num-steps")
    cfg.study = cfg.study or f"{cfg.script}-{base.env_id}"
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", cfg.study):
        raise ValueError(f"--study {cfg.study!r}: use letters, digits, '.', '-' and '_', starting with a letter or digit")
    cfg.study_dir = os.path.abspath(cfg.study_dir or os.path.join(HERE, "studies", cfg.study))
    if "://" not in (cfg.storage or ""):
        cfg.storage = os.path.abspath(cfg.storage or os.path.join(cfg.study_dir, "journal.log"))
        if cfg.storage != os.path.join(cfg.study_dir, "journal.log") and not os.path.isdir(os.path.dirname(cfg.storage)):
            raise ValueError(f"--storage {cfg.storage}: its folder does not exist")
        if os.path.isdir(cfg.storage):
            raise ValueError(f"--storage {cfg.storage} is a folder: give a file, or an RDB URL")
    cfg.runs = [("--seed", str(s), *x) for x in ((), ("--no-compile",))[:1 + cfg.also_no_compile]
                for s in range(1, cfg.seeds + 1)]
    cfg.total_timesteps = base.total_timesteps
    cfg.eval_every_steps = cfg.eval_every_steps or max(1, base.total_timesteps // 10)
    return cfg


def identity(cfg) -> dict:
    """What must not change when a study is continued."""
    keys = ("script", "fixed_flags", "objective", "score", "runs", "eval_every_steps", "periodic_eval_episodes")
    return json.loads(json.dumps({**{k: getattr(cfg, k) for k in keys},
                                  "space": {k: v._asdict() for k, v in cfg.space.items()}}))


def open_study(cfg, create: bool = True):
    """Create the study (its creator enqueues the script's defaults), or load it and check it is the same search."""
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
        study = optuna.create_study(direction="maximize", **kw)
    except optuna.exceptions.DuplicatedStudyError:
        try:
            study = optuna.load_study(**kw)
        except KeyError:
            raise ValueError(f"no study {cfg.study} in {cfg.storage}: nothing to summarize") from None
        for _ in range(50):  # its creator may be setting it up
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
    if not cfg.no_defaults_first and all(defaults[n] in p.choices if p.choices else p.low <= defaults[n] <= p.high
                                         for n, p in cfg.space.items()):
        study.enqueue_trial(defaults)
    return study


def storage_error(e: Exception) -> str | None:
    """One line for what a user or the machine can cause when opening a storage; None for a bug."""
    import sqlalchemy.exc

    if isinstance(e, ImportError):
        return "--storage: this URL's database driver is missing: pip install -r benchmark/requirements.txt"
    if isinstance(e, sqlalchemy.exc.ArgumentError):
        return f"--storage: not a database URL ({str(e).splitlines()[0]}); e.g. postgresql://user@host/db"
    if isinstance(e, sqlalchemy.exc.DBAPIError):
        return f"--storage: cannot open the database: {str(e.orig).strip().splitlines()[0]}"
    return f"cannot write the study's files: {e}" if isinstance(e, OSError) else None


def main(argv: list[str] | None = None) -> int:
    if optuna is None:
        print("error: the tuner needs optuna, pandas and matplotlib: pip install -r benchmark/requirements.txt",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg, new = parse_args(sys.argv[1:] if argv is None else argv), False
    try:
        cfg = make_config(*cfg)
        if cfg.trials == 0:  # the summary only: nothing is created or written
            if "://" not in cfg.storage and not os.path.isfile(cfg.storage):
                raise ValueError(f"no study at {cfg.storage}: nothing to summarize")
            print(summarize(open_study(cfg, create=False), cfg), flush=True)
            return 0
        new = not os.path.exists(cfg.study_dir)
        os.makedirs(os.path.join(cfg.study_dir, "logs"), exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.study_dir).close()  # writable, even for root
        study = open_study(cfg)
    except Exception as e:  # noqa: BLE001  (bad input; a storage or a folder that cannot be used)
        if (message := str(e) if isinstance(e, ValueError) else storage_error(e)) is None:
            raise
        if new:  # leave nothing behind
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
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
        if tuner.taken_over is None and tuner.write_error is None and not isinstance(e, OSError):
            raise
        print(f"error: trial {tuner.taken_over} was failed by another worker, as this one was silent for more than "
              f"--stale-after {cfg.stale_after} s (paused?): it stops" if tuner.taken_over is not None else
              f"error: cannot write the study ({tuner.write_error or e}): free space and run the same command again",
              file=sys.stderr)
        code = 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    try:
        print(write_summary(study, cfg), f"\nwritten: {os.path.join(cfg.study_dir, 'summary.md')}", flush=True)
    except OSError as e:
        print(f"error: cannot write the summary in {cfg.study_dir} ({e})", file=sys.stderr)
        code = code or 1
    if tuner.failures >= cfg.max_failures:
        print(f"error: stopped after {tuner.failures} failed trials (logs: {os.path.join(cfg.study_dir, 'logs')})",
              file=sys.stderr)
    return 128 + received[0] if received else 1 if tuner.failures >= cfg.max_failures else code


if __name__ == "__main__":
    sys.exit(main())

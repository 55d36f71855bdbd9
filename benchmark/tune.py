"""Hyperparameter search for ppo_discrete.py or ppo_continuous.py with Optuna (issues 11, 20, 25).

    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 20 --total-timesteps 100000
    python benchmark/tune.py ppo_continuous --env-id Pendulum-v1 --workers 2 --seeds 2 --gamma 0.99
    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --trials 0   # create or open; summary only

Any flag that is not the tuner's is the script's own (--env-id, --total-timesteps, --gamma, ...):
given to every trial, and no longer searched. The search space is sample_params() below, one line
a hyperparameter, as rl-baselines3-zoo writes it: edit it there.

A trial trains in this process, through the script's own make_agent_and_optimizer() and train(),
and evaluates the policy in train()'s after_iteration hook for the pruner. In process rather than
as a subprocess: there is no command line to build and no output to parse, and a trial dies with
its worker (a kill -9 leaves no orphan). Training is Python-bound (the envs, tiny nets), so
--workers N starts N processes, not Optuna's n_jobs threads, which would share one GIL.

The rest is Optuna's: TPE and the median pruner; RDBStorage, on SQLite in the study folder by
default or on any database URL for many machines, with its heartbeat: a trial whose worker went
silent is failed by the next worker that starts a trial, and queued once more
(RetryHeartbeatStaleTrialCallback, Optuna 5's name for RetryFailedTrialCallback);
MaxTrialsCallback for the budget; Optuna's log lines for progress; trials_dataframe() and
Optuna's plots for the summary. benchmark/TUNING.md says how to run a study on many machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
import typing
import warnings

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget (--trials) counts
EVALS = 10  # evaluations per run, for the pruner; the last, after the last iteration, is the run's score
# What a user or the machine can cause when a storage is opened or written: one line, not a traceback.
STORAGE_ERRORS = (OSError, ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError)


def sample_params(trial) -> dict:
    """The search space, in the script's names (minibatch_size becomes num_minibatches)."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 5e-5, 3e-3, log=True),
        "num_envs": trial.suggest_categorical("num_envs", [4, 8, 16, 32]),
        "num_steps": trial.suggest_categorical("num_steps", [64, 128, 256, 512, 1024, 2048]),
        "minibatch_size": trial.suggest_categorical("minibatch_size", [32, 64, 128, 256, 512, 1024]),
        "update_epochs": trial.suggest_int("update_epochs", 1, 10),
        "gamma": trial.suggest_categorical("gamma", [0.98, 0.99, 0.995, 0.999, 0.9999]),
        "gae_lambda": trial.suggest_categorical("gae_lambda", [0.9, 0.95, 0.98, 0.99, 1.0]),
        "ent_coef": trial.suggest_float("ent_coef", 1e-5, 0.05, log=True),
        "clip_coef": trial.suggest_categorical("clip_coef", [0.1, 0.2, 0.3]),
        "hidden_size": trial.suggest_categorical("hidden_size", [32, 64, 128, 256]),
    }


class Given:
    """The trial as sample_params sees it: a hyperparameter given as a flag is that value, not searched."""

    def __init__(self, trial, given: dict):
        self.trial, self.given = trial, dict(given)
        if "num_minibatches" in given:  # it fixes the minibatch size too
            self.given["minibatch_size"] = None

    def __getattr__(self, name: str):  # suggest_float, suggest_int, suggest_categorical
        suggest = getattr(self.trial, name)
        return lambda key, *a, **kw: self.given[key] if key in self.given else suggest(key, *a, **kw)


def make_args(module, given: dict, params: dict, **override):
    """The script's Args: its defaults, then the given flags, a trial's values and the overrides."""
    values = {**given, **{k: v for k, v in params.items() if v is not None}, **override}
    args = module.Args(**{k: v for k, v in values.items() if k != "minibatch_size"})
    if (size := values.get("minibatch_size")) is not None:
        count = max(1, args.batch_size // size)
        while args.batch_size % count:  # equal minibatches of about that size, as the script requires
            count -= 1
        args = dataclasses.replace(args, num_minibatches=count)
    return args


def command(module, args) -> str:
    """The script's command line that trains these Args (seed aside)."""
    default, flags = module.Args(), []
    for name in (f.name for f in dataclasses.fields(args) if f.name != "seed"):
        if (value := getattr(args, name)) != getattr(default, name):
            flag = name.replace("_", "-")
            flags.append(f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value}")
    return " ".join([f"python {module.__name__}.py", *flags])


def run_seed(trial, cfg, module, args, k: int) -> float:
    """Train one seed, evaluating EVALS times; the pruner sees seed k's evaluation i at step
    k * EVALS + i, so trials of every batch size meet at the same steps. Returns the last score."""
    agent, optimizer = module.make_agent_and_optimizer(args)
    every, scores, stopped = args.total_timesteps / EVALS, [], []

    def hook(*, global_step, **_) -> bool:
        last = global_step + args.batch_size > args.total_timesteps  # no further whole batch fits
        i = EVALS if last else int(global_step / every)
        if i <= (scores[-1][0] if scores else 0):  # not yet at the next tenth of the run
            return False
        if not all(p.isfinite().all() for p in agent.parameters()):
            stopped.append(f"diverged: weights not finite at step {global_step:,} of seed {args.seed}")
            return True
        # Unseen episodes (seeds far from the training envs' seed + i, as the script's own evaluation).
        returns = module.evaluate(agent, args.env_id, cfg.eval_episodes, args.seed + 1_000_000)
        scores.append((i, float(returns.mean() - returns.std())))  # mean - std: a policy that is good every time
        trial.report(scores[-1][1], k * EVALS + i)
        if trial.should_prune():
            stopped.append(f"pruned at step {global_step:,} of seed {args.seed}: {scores[-1][1]:.1f}")
        return bool(stopped)

    module.train(args, agent, optimizer, after_iteration=hook)
    if stopped:  # a diverged run is a bad region for TPE to learn, not a failure of the tuner
        raise optuna.TrialPruned(stopped[0])
    return scores[-1][1]


def objective(trial, cfg, module) -> float:
    args = make_args(module, cfg.given, sample_params(Given(trial, cfg.given)))
    trial.set_user_attr("command", command(module, args))
    if error := args.check():  # a combination the script refuses (a batch larger than the run): this trial's result
        raise optuna.TrialPruned(error)
    scores = [run_seed(trial, cfg, module, dataclasses.replace(args, seed=k + 1), k) for k in range(cfg.seeds)]
    trial.set_user_attr("seed_scores", scores)
    return min(scores)  # the worst seed: hyperparameters that work whatever the seed


# ---- Bad input, before any trial: the flags, the env, every value of the space ---------------------
def check_input(cfg, module) -> str | None:
    """The first thing that can never train, as one line saying what to do; None if all can."""
    for name in ("trials", "workers", "seeds", "eval_episodes", "heartbeat"):
        if (value := getattr(cfg, name)) < (name != "trials"):
            return f"--{name.replace('_', '-')} must be {'0 or more' if name == 'trials' else 'positive'}, got {value}"
    base = make_args(module, cfg.given, {})
    # The run made huge: whether a batch fits the run depends on the sizes a trial draws, so that is
    # the trial's result (pruned). Scaling keeps a --total-timesteps of 0 or less refused.
    if error := make_args(module, cfg.given, {}, total_timesteps=base.total_timesteps * 2**40).check():
        return f"{module.__name__}.py: {error}"
    if error := module.check_env(base.env_id):
        return f"{module.__name__}.py: {error}"
    trial = optuna.create_study().ask()  # in memory: the space as Optuna's distributions, their ranges checked
    try:
        sample_params(Given(trial, cfg.given))
    except ValueError as e:
        return f"sample_params: {e}"
    cfg.space = trial.distributions
    for name, dist in cfg.space.items():
        for value in getattr(dist, "choices", None) or (dist.low, dist.high):
            try:
                args = make_args(module, cfg.given, {name: value}, total_timesteps=base.total_timesteps * 2**40)
            except TypeError:
                return f"sample_params: {name} is not a hyperparameter of {module.__name__}.py"
            if error := args.check():
                return f"sample_params: {name} = {value} can never train ({error})"
    return None


# ---- The storage, the workers, the summary ----------------------------------------------------------
def open_storage(cfg):
    # SQLite: a writer waits up to a minute for another's lock (Python's default, 5 s, is short for
    # several workers and their heartbeats on one file). The grace period is three beats, not
    # Optuna's two: a beat can be late on a loaded machine, and a live trial failed is work lost.
    return optuna.storages.RDBStorage(
        cfg.storage, engine_kwargs={"connect_args": {"timeout": 60}} if cfg.storage.startswith("sqlite") else {},
        heartbeat_interval=cfg.heartbeat, grace_period=3 * cfg.heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


def work(cfg) -> int:
    """One worker: trials until the study holds --trials finished ones (each worker checks after
    its own trial, so N workers can overshoot by N - 1), then a last look for a dead worker's trial."""
    import torch

    torch.set_num_threads(1)  # fastest for these tiny nets, and N workers do not fight over the cores
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Slurm's time limit: as Ctrl-C, the trial fails at once
    module = importlib.import_module(cfg.script)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=open_storage(cfg), pruner=optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=EVALS // 5), sampler=optuna.samplers.TPESampler(
            n_startup_trials=5, constant_liar=True))  # the liar: parallel workers do not draw the same point
        if len(study.get_trials(deepcopy=False, states=FINISHED)) < cfg.trials:
            study.optimize(lambda trial: objective(trial, cfg, module), callbacks=[
                optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED)],
                catch=(optuna.exceptions.UpdateFinishedTrialError,))  # this worker was silent; its trial failed
        for _ in range(4):  # a trial of a worker killed a moment ago turns stale within 3 beats: fail it
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(cfg.heartbeat)
            optuna.storages.fail_stale_trials(study)
    except KeyboardInterrupt:  # Optuna has failed the running trial
        return 130
    except STORAGE_ERRORS as e:
        print(f"error: the study's storage: {str(e).strip().splitlines()[0]}; run the same command again once "
              "it is fixed", file=sys.stderr)
        return 1
    return 0


def summarize(study, cfg) -> str:
    """The trial counts, the best trials and the command of the best; trials.csv and two plots."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

    df = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params"))
    counts = df["state"].value_counts() if len(df) else {}
    lines = [f"study {cfg.study} in {cfg.storage}: {len(df)} trials (" + ", ".join(
        f"{counts.get(s.name, 0)} {s.name.lower()}" for s in TrialState) + ")"]
    df.to_csv(os.path.join(cfg.study_dir, "trials.csv"), index=False)
    if not (df["state"] == "COMPLETE").any() if len(df) else True:
        return "\n".join(lines + ["no complete trial yet"])
    best = study.best_trial
    lines += [df[df["state"] == "COMPLETE"].sort_values("value", ascending=False).head(5).to_string(index=False),
              f"best: trial {best.number}, {best.value:.1f} (the worst seed's final mean - std). Train it:",
              f"  {best.user_attrs['command']}"]
    for name, plot in (("history.png", plot_optimization_history), ("evaluations.png", plot_intermediate_values)):
        ax = plot(study)
        if ax.get_legend() is not None:
            ax.get_legend().remove()  # one entry per trial
        ax.figure.savefig(os.path.join(cfg.study_dir, name), dpi=100, bbox_inches="tight")
        matplotlib.pyplot.close(ax.figure)
    return "\n".join(lines + [f"written: trials.csv, history.png, evaluations.png in {cfg.study_dir}"])


# ---- The command line --------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (python benchmark/tune.py SCRIPT --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]):
    """The tuner's flags, then the script's Args as its own flags (--env-id, --no-anneal-lr, ...)."""
    p = Parser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    add = p.add_argument
    add("script", choices=["ppo_discrete", "ppo_continuous"])
    add("--trials", type=int, default=20, help="finished (complete + pruned) trials the study should hold (0: summary)")
    add("--workers", type=int, default=1, help="trials at once, one process each")
    add("--seeds", type=int, default=1, help="seeds per trial; its value is the worst seed's")
    add("--eval-episodes", type=int, default=20, help=f"episodes of each of a run's {EVALS} evaluations")
    add("--study", help="study name (default: SCRIPT-ENV_ID)")
    add("--study-dir", help="summary files, and the SQLite storage (default: benchmark/studies/STUDY)")
    add("--storage", help="a database URL (postgresql://user@host/db) shared by many machines (default: SQLite)")
    add("--heartbeat", type=int, default=10, help="seconds between beats; silent 3 beats, a trial is failed and retried")
    cfg, _ = p.parse_known_args(argv)
    sys.path.insert(0, ROOT)
    module = importlib.import_module(cfg.script)
    hints, group = typing.get_type_hints(module.Args), p.add_argument_group(f"{cfg.script}.py's flags")
    for field in dataclasses.fields(module.Args):
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        if field.name != "seed":  # the tuner runs seeds 1..--seeds
            group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                               **{"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind})
    add("-h", "--help", action="help")
    cfg = p.parse_args(argv)
    cfg.given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(module.Args) if hasattr(cfg, f.name)}
    return cfg, module


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    cfg, module = parse_args(sys.argv[1:] if argv is None else argv)
    if error := check_input(cfg, module):
        print(f"error: {error}", file=sys.stderr)
        return 2
    cfg.study = cfg.study or f"{cfg.script}-{make_args(module, cfg.given, {}).env_id}"
    cfg.study_dir = os.path.abspath(cfg.study_dir or os.path.join(HERE, "studies", cfg.study))
    cfg.storage, new = cfg.storage or f"sqlite:///{os.path.join(cfg.study_dir, 'study.db')}", not os.path.exists(cfg.study_dir)
    try:  # the study (and the tables of a new database) made here once, before any worker starts
        os.makedirs(cfg.study_dir, exist_ok=True)
        try:
            study = optuna.create_study(study_name=cfg.study, storage=open_storage(cfg), direction="maximize")
            base = make_args(module, cfg.given, {})  # the script's defaults first, where they lie in the space
            study.enqueue_trial({name: value for name, dist in cfg.space.items() if (value := getattr(base, name)) in (
                dist.choices if hasattr(dist, "choices") else ()) or not hasattr(dist, "choices") and dist.low <= value <= dist.high})
        except optuna.exceptions.DuplicatedStudyError:  # a study to continue
            study = optuna.load_study(study_name=cfg.study, storage=open_storage(cfg))
    except STORAGE_ERRORS as e:
        if new:  # leave nothing behind
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
        print(f"error: cannot open the study: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    context, code = multiprocessing.get_context("spawn"), 0  # spawn: no database connection shared by a fork
    workers = [context.Process(target=work, args=(cfg,)) for _ in range(cfg.workers - 1)] if cfg.trials else []
    try:
        for worker in workers:
            worker.start()
        code = work(cfg) if cfg.trials else 0
    except KeyboardInterrupt:
        code = 130
    for worker in workers:  # Ctrl-C in a terminal reaches them too: each fails its trial and ends
        worker.join()
    try:
        print(summarize(study, cfg), flush=True)
    except OSError as e:
        print(f"error: cannot write the summary in {cfg.study_dir}: {e.strerror or e}", file=sys.stderr)
        return code or 1
    return code or max((w.exitcode or 0 for w in workers), default=0)


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter search for ppo_discrete.py or ppo_continuous.py with Optuna (issues 11, 20, 25).

    python benchmark/tune.py ppo_discrete --env-id CartPole-v1 --total-timesteps 50000 --trials 20 --workers 2

Other flags are the script's own (--env-id, --gamma, ...): given to every trial, no longer searched.
A trial trains in process, through the script's train(), and evaluates in its after_iteration hook:
nothing to parse, and a trial dies with its worker (no orphan after a kill -9). Training is Python-
bound, so --workers N starts N processes (Optuna's n_jobs threads would share one GIL). Optuna does
the rest: TPE, the median pruner, MaxTrialsCallback, RDBStorage (SQLite by default, or a database
URL) with its heartbeat, which fails a silent worker's trial, and RetryHeartbeatStaleTrialCallback
(formerly RetryFailedTrialCallback), which queues it once more; trials_dataframe() and its plots.
"""

import argparse, dataclasses, importlib, logging, multiprocessing, os, shutil, signal, sys, time, typing, warnings

import optuna
import sqlalchemy.exc
import torch
from optuna.trial import TrialState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget, --trials, counts
EVALS = 10  # evaluations per run, for the pruner; the last, after the last iteration, is the run's score
STORAGE_ERRORS = (OSError, ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError)  # a user's or the machine's
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat's, since 2.x
# Ctrl-C, or a paused worker's trial failed by another: Optuna's next line says the trial failed, no traceback.
logging.getLogger("optuna.study._optimize").addFilter(
    lambda r: not r.exc_info or r.exc_info[0] not in (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError))


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
        self.trial, self.given = trial, {**given, **({"minibatch_size": None} if "num_minibatches" in given else {})}

    def __getattr__(self, name: str):  # suggest_float, suggest_int, suggest_categorical
        return lambda key, *a, **kw: self.given[key] if key in self.given else getattr(self.trial, name)(key, *a, **kw)


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


def objective(trial, cfg, module) -> float:
    """Train seeds 1..--seeds, evaluating at each tenth of the run; the pruner sees seed k's evaluation
    i at step k * EVALS + i, where trials of every batch size meet. The worst seed's last score."""
    args, scores = make_args(module, cfg.given, sample_params(Given(trial, cfg.given))), []
    trial.set_user_attr("command", " ".join([f"python {module.__name__}.py"] + [  # seed aside
        (f"--{'' if v else 'no-'}{f}" if isinstance(v, bool) else f"--{f} {v}").replace("_", "-") for f, v in
        dataclasses.asdict(args).items() if f != "seed" and v != getattr(module.Args, f)]))
    if error := args.check():  # a combination the script refuses (a batch larger than the run): the result
        raise optuna.TrialPruned(error)
    for k in range(cfg.seeds):
        args = dataclasses.replace(args, seed=k + 1)
        agent, optimizer = module.make_agent_and_optimizer(args)
        evals, stopped = [(0, None)], []

        def hook(*, global_step, **_) -> bool:
            last = global_step + args.batch_size > args.total_timesteps  # no further whole batch fits
            if (i := EVALS if last else global_step * EVALS // args.total_timesteps) <= evals[-1][0]:
                return False
            if not all(p.isfinite().all() for p in agent.parameters()):
                stopped.append(f"diverged: weights not finite at step {global_step:,} of seed {args.seed}")
                return True
            # Unseen episodes (far from the training envs' seeds); mean - std: good every time, not on average
            returns = module.evaluate(agent, args.env_id, cfg.eval_episodes, args.seed + 1_000_000)
            evals.append((i, float(returns.mean() - returns.std())))
            trial.report(evals[-1][1], k * EVALS + i)
            if trial.should_prune():
                stopped.append(f"pruned at step {global_step:,} of seed {args.seed}: {evals[-1][1]:.1f}")
            return bool(stopped)

        module.train(args, agent, optimizer, after_iteration=hook)
        if stopped:  # diverged too: a bad region for TPE to learn, not a failure of the tuner
            raise optuna.TrialPruned(stopped[0])
        scores.append(evals[-1][1])
    return min(scores)  # the worst seed: hyperparameters that work whatever the seed


def check_input(cfg, module) -> str | None:
    """Before any trial: the first flag, env or value of the space that can never train, as one line."""
    for name in ("trials", "workers", "seeds", "eval_episodes", "heartbeat"):
        if (value := getattr(cfg, name)) < (name != "trials"):
            return f"--{name.replace('_', '-')} must be {'0 or more' if name == 'trials' else 'positive'}, got {value}"
    # The run made huge: whether a batch fits it depends on the sizes a trial draws, so that is the
    # trial's result (pruned). Scaled, a --total-timesteps of 0 or less stays refused.
    cfg.base = base = make_args(module, cfg.given, {})
    if error := make_args(module, cfg.given, {}, total_timesteps=base.total_timesteps * 2**40).check() or \
            module.check_env(base.env_id):
        return f"{module.__name__}.py: {error}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the probe's study is no news
    trial = optuna.create_study().ask()  # in memory: the space as Optuna's distributions, ranges checked
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        sample_params(Given(trial, cfg.given))
    except ValueError as e:
        return f"sample_params: {e}"
    cfg.space = trial.distributions
    if unknown := set(cfg.space) - {f.name for f in dataclasses.fields(module.Args)} - {"minibatch_size"}:
        return f"sample_params: {unknown.pop()} is not a hyperparameter of {module.__name__}.py"
    for name, value in ((n, v) for n, d in cfg.space.items() for v in getattr(d, "choices", None) or (d.low, d.high)):
        if error := make_args(module, cfg.given, {name: value}, total_timesteps=base.total_timesteps * 2**40).check():
            return f"sample_params: {name} = {value} can never train ({error})"


def open_storage(cfg):
    # Grace: 3 beats, not Optuna's 2 (a beat is late on a loaded machine). SQLite: wait a minute for the lock,
    # and take it first: SQLite ignores SELECT ... FOR UPDATE, so two workers could pop one trial (optuna#4002).
    storage = optuna.storages.RDBStorage(cfg.storage, heartbeat_interval=cfg.heartbeat, grace_period=3 * cfg.heartbeat,
        engine_kwargs={"connect_args": {"timeout": 60, "isolation_level": None}} if cfg.storage[:6] == "sqlite" else {},
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    if storage.engine.name == "sqlite":
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def work(cfg, workers=None) -> int:
    """Trials until the study holds --trials finished ones. The first worker (workers: the others, spawned
    so that no database connection is shared by a fork) then fails a dead worker's trial, if any."""
    torch.set_num_threads(1)  # fastest for these tiny nets, and N workers do not fight over the cores
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Slurm's time limit: as Ctrl-C
    try:
        for worker in workers or ():
            worker.start()
        study = optuna.load_study(study_name=cfg.study, storage=open_storage(cfg), pruner=optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=EVALS // 5), sampler=optuna.samplers.TPESampler(
            n_startup_trials=5, constant_liar=True))  # the liar: parallel workers do not draw the same point
        if len(study.get_trials(deepcopy=False, states=FINISHED)) < cfg.trials:
            study.optimize(lambda trial: objective(trial, cfg, importlib.import_module(cfg.script)),
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED)])
        for worker in workers or ():
            worker.join()
        for _ in range(4 if workers is not None else 0):  # a worker killed a moment ago: stale after 3 beats
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(cfg.heartbeat)
            optuna.storages.fail_stale_trials(study)
    except KeyboardInterrupt:  # Optuna has failed the running trial; a terminal's Ctrl-C reaches all workers
        return 130
    except STORAGE_ERRORS as e:  # a full disk; this worker's trial failed by another as it was silent (paused)
        print(f"error: {str(e).strip().splitlines()[0]} (run the same command to go on)", file=sys.stderr)
        return 1
    return 0


def summarize(study, cfg) -> str:
    """The trial counts, the best trials and the command of the best; trials.csv and two plots."""
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

    df = study.trials_dataframe(attrs=("number", "value", "state", "params"))
    df.to_csv(os.path.join(cfg.study_dir, "trials.csv"), index=False)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    text = f"{cfg.study} in {cfg.storage}: " + ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState)
    if TrialState.COMPLETE not in states:
        return text + "\nno complete trial yet"
    for name, plot in (("history.png", plot_optimization_history), ("evaluations.png", plot_intermediate_values)):
        ax = plot(study)
        ax.get_legend() and ax.get_legend().remove()  # one entry per trial
        ax.figure.savefig(os.path.join(cfg.study_dir, name), dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
    top = df[df["state"] == "COMPLETE"].drop(columns="state").sort_values("value", ascending=False).head(5)
    return "\n".join([text, top.rename(columns=lambda c: c.removeprefix("params_")).to_string(index=False),
                      f"best: trial {study.best_trial.number}, {study.best_value:.1f} (the worst seed's final mean - "
                      f"std), written with trials.csv and two plots in {cfg.study_dir}. Train it:",
                      f"  {study.best_trial.user_attrs['command']}"])


def parse_args(argv: list[str]):
    """The tuner's flags, then the script's Args as its own flags (--env-id, --no-anneal-lr, ...)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    p.error = lambda message: sys.exit(print(f"error: {message} (tune.py SCRIPT --help)", file=sys.stderr) or 2)
    p.add_argument("script", choices=["ppo_discrete", "ppo_continuous"])
    p.add_argument("--trials", type=int, default=20, help="finished (complete, pruned) trials to hold")
    p.add_argument("--workers", type=int, default=1, help="trials at once, one process each")
    p.add_argument("--seeds", type=int, default=1, help="seeds per trial, which scores its worst")
    p.add_argument("--eval-episodes", type=int, default=20, help=f"episodes of a run's {EVALS} evaluations each")
    p.add_argument("--study", help="study name (default: SCRIPT-ENV_ID)")
    p.add_argument("--study-dir", help="summary, SQLite storage (default: benchmark/studies/STUDY)")
    p.add_argument("--storage", help="a database URL for many machines: postgresql://user@host/db")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds a beat; a trial silent 3 beats fails (retried)")
    sys.path.insert(0, ROOT)
    module = importlib.import_module(p.parse_known_args(argv)[0].script)
    hints, group = typing.get_type_hints(module.Args), p.add_argument_group(f"{module.__name__}.py's flags")
    for field in (f for f in dataclasses.fields(module.Args) if f.name != "seed"):  # seeds: 1..--seeds
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                           **{"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind})
    p.add_argument("-h", "--help", action="help")
    cfg = p.parse_args(argv)
    cfg.given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(module.Args) if hasattr(cfg, f.name)}
    return cfg, module


def main(argv: list[str] | None = None) -> int:
    cfg, module = parse_args(sys.argv[1:] if argv is None else argv)
    if error := check_input(cfg, module):
        print(f"error: {error}", file=sys.stderr)
        return 2
    cfg.study = cfg.study or f"{cfg.script}-{cfg.base.env_id}"
    cfg.study_dir = os.path.abspath(cfg.study_dir or os.path.join(ROOT, "benchmark", "studies", cfg.study))
    cfg.storage, new = cfg.storage or f"sqlite:///{cfg.study_dir}/study.db", not os.path.exists(cfg.study_dir)
    try:  # the study, and the tables of a new database, made once here before any worker starts
        os.makedirs(cfg.study_dir, exist_ok=True)
        study = optuna.create_study(study_name=cfg.study, storage=open_storage(cfg), direction="maximize",
                                    load_if_exists=True)
        if not study.trials:  # the script's defaults first, where they lie in the space
            study.enqueue_trial({n: v for n, d in cfg.space.items() if (v := getattr(cfg.base, n)) in getattr(
                d, "choices", ()) or not hasattr(d, "choices") and d.low <= v <= d.high})
    except STORAGE_ERRORS as e:
        if new:  # leave nothing behind
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
        print(f"error: cannot open the study: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    workers = [multiprocessing.get_context("spawn").Process(target=work, args=(cfg,)) for _ in range(cfg.workers - 1)]
    code = work(cfg, workers) if cfg.trials else 0
    try:
        print(summarize(study, cfg), flush=True)
    except OSError as e:
        print(f"error: cannot write the summary in {cfg.study_dir}: {e.strerror or e}", file=sys.stderr)
        return code or 1
    return code or max((w.exitcode or 0 for w in workers), default=0)


if __name__ == "__main__":
    sys.exit(main())

"""What the tuner's tests share: tiny CartPole trials, a tuner killed mid-write, a throwaway PostgreSQL."""
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import optuna

from conftest import ROOT

TUNE = os.path.join(ROOT, "benchmark", "tune.py")
# Four 64-step iterations, each followed by an evaluation of 2 episodes: a trial takes about a second.
TINY = ["ppo_discrete", "--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
        "--update-epochs", "1", "--total-timesteps", "256", "--eval-episodes", "2", "--heartbeat", "1"]
STUDY = "ppo_discrete-CartPole-v1"
# A tuner that SIGKILLs itself in its first trial, inside the transaction that writes the trial's
# first evaluation: the statement is sent, the commit never comes. A kill -9 from outside at that
# moment, made certain.
KILLED_MID_WRITE = """import os, runpy, sys, sqlalchemy
def kill(conn, cursor, statement, *args):
    if statement.startswith("INSERT INTO trial_intermediate_values"):
        os.kill(os.getpid(), 9)
sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", kill)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_killed_mid_write(*argv):
    return subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, TUNE, *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trials(storage, name=STUDY, states=None):
    """The study's trials as plain Optuna reads them."""
    return optuna.load_study(study_name=name, storage=storage).get_trials(states=states)


def check_killed_trial_failed_once(done, budget):
    """The killed worker's trial failed (its write lost) and was queued once more with the same
    parameters; the budget finished exactly, each trial once; nothing left RUNNING."""
    states = [t.state for t in done]
    failed = [t for t in done if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].intermediate_values == {}, states
    retries = [t for t in done if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params, states
    assert sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states) == budget
    assert optuna.trial.TrialState.RUNNING not in states


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on a local socket for the length of the block: TUNE_TEST_POSTGRES if set
    (.ci/run starts one), else a throwaway cluster of an installed PostgreSQL, run as the postgres
    user when we are root (initdb refuses root). Yields its URL; raises RuntimeError saying why not."""
    if os.environ.get("TUNE_TEST_POSTGRES"):
        yield os.environ["TUNE_TEST_POSTGRES"]
        return
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if initdb[-1] is None:
        raise RuntimeError("no PostgreSQL server is installed and TUNE_TEST_POSTGRES is unset")
    bin_dir, folder = os.path.dirname(initdb[-1]), tempfile.mkdtemp(prefix="tune-pg-")
    prefix = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]
    data = os.path.join(folder, "data")

    def pg(*cmd):
        out = subprocess.run([*prefix, *cmd], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {(out.stderr or out.stdout).strip()[-300:]}")

    try:
        pg(os.path.join(bin_dir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres")
        pg(os.path.join(bin_dir, "pg_ctl"), "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
           f"-k {folder} -c listen_addresses=''", "start")
        try:
            yield f"postgresql://postgres@/postgres?host={folder}"
        finally:
            pg(os.path.join(bin_dir, "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def new_database(url, name):
    """A fresh database on the server of url; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return engine.url.set(database=name).render_as_string(hide_password=False)

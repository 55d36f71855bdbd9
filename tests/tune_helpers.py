"""What the tuner's tests share: tiny CartPole trials, tuner processes, a throwaway PostgreSQL server."""
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from conftest import ROOT

TUNE = os.path.join(ROOT, "benchmark", "tune.py")
# Four 64-step iterations, an evaluation after each, 2 episodes: a trial is about a process start-up.
TINY = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
        "--update-epochs", "1", "--total-timesteps", "256", "--eval-episodes", "2", "--periodic-eval-episodes", "2"]
STUDY = "ppo_discrete-CartPole-v1"


def tune_args(study_dir, *extra):
    return ["ppo_discrete", *TINY, "--study-dir", str(study_dir), *extra]


def start(study_dir, *extra):
    """The tuner as a process in its own group, as a terminal or a batch system would start it."""
    return subprocess.Popen([sys.executable, TUNE, *tune_args(study_dir, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)


def read_until(proc, text, lines=None):
    lines = [] if lines is None else lines
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n{''.join(lines)}")


def children(pid, within=20.0):
    """The processes whose parent is pid (Linux's /proc), once there is one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        kids = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError), open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(stat.split("/")[2]))
        if kids:
            return kids
        time.sleep(0.1)
    return []


def gone(pid, within=20.0):
    """Whether process pid ends (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on a local socket for the length of the block: TUNE_TEST_POSTGRES if set
    (.ci/run starts one), else a throwaway cluster of Debian's package, run as the postgres user
    when we are root (initdb refuses root). Yields its URL; raises RuntimeError saying why not."""
    if os.environ.get("TUNE_TEST_POSTGRES"):
        yield os.environ["TUNE_TEST_POSTGRES"]
        return
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if initdb[-1] is None:
        raise RuntimeError("TUNE_TEST_POSTGRES is unset and no PostgreSQL server is installed: "
                           "apt-get install postgresql, or run bash .ci/run")
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
            raise RuntimeError(f"{' '.join(cmd[:1])} failed: {(out.stderr or out.stdout).strip()[-500:]}")

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

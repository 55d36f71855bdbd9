"""benchmark/tune.py on a real PostgreSQL server, as many machines share a study. The server is
TUNE_TEST_POSTGRES (.ci/run starts one), or a throwaway one started here from an installed
PostgreSQL. Without one the test is skipped, saying how to run it; under .ci/run
(TUNE_REQUIRE_POSTGRES=1) it fails instead."""
import os
import subprocess
import sys
import time
import uuid

import pytest
from optuna.trial import TrialState

from conftest import ROOT
from tune_helpers import TINY, TUNE, check_killed_trial_failed_once, new_database, postgres_server, \
    start_killed_mid_write, trials

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tune  # noqa: E402

# Optuna calls the heartbeat and its plots experimental; tune.py silences that, pytest resets it per test.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(scope="module")
def server():
    try:
        with postgres_server() as url:
            yield url
    except RuntimeError as e:
        why = f"no PostgreSQL server for the tuner's test: {e}"
        if os.environ.get("TUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(why)
        pytest.skip(f"{why}; run it with bash .ci/run, or with TUNE_TEST_POSTGRES=postgresql://... (a server "
                    "where it may create databases) python -m pytest tests/test_tune_postgres.py")


def test_two_tuners_one_killed_mid_trial(server, tmp_path):
    """The study made first (--trials 0, as TUNING.md says before a Slurm array), then two tuner
    processes on it: the first is killed with SIGKILL in its first trial, in the middle of a write;
    the second, started once the first has its trial, fills the budget: the dead trial failed and
    queued once, none RUNNING, none counted twice. (Started together, the second could fill the
    budget before the first, slower to start on a busy machine, took any trial.)"""
    database = new_database(server, f"tune_{uuid.uuid4().hex[:12]}")
    argv = [*TINY, "--storage", database, "--trials", "3"]
    assert tune.main([*argv[:-1], "0", "--study-dir", str(tmp_path / "setup")]) == 0
    killed = start_killed_mid_write(*argv, "--study-dir", str(tmp_path / "a"))
    deadline = time.monotonic() + 120
    while killed.poll() is None and not trials(database, states=(TrialState.RUNNING,)) and time.monotonic() < deadline:
        time.sleep(0.05)
    other = subprocess.Popen([sys.executable, TUNE, *argv, "--study-dir", str(tmp_path / "b")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_out, out = killed.communicate(timeout=120)[0], other.communicate(timeout=300)[0]
    assert killed.returncode == -9, killed_out
    assert other.returncode == 0, out
    check_killed_trial_failed_once(trials(database), budget=3)

"""benchmark/tune.py on a real PostgreSQL server, as many machines would share a study: the server is
TUNE_TEST_POSTGRES (.ci/run starts one), or a throwaway one started here. No server, no pass: the
tests fail and say why."""
import multiprocessing
import os
import signal
import sys
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT
from tune_helpers import STUDY, children, gone, new_database, postgres_server, read_until, start, tune_args

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tune  # noqa: E402

FAST = ["--heartbeat", "1", "--stale-after", "2"]


@pytest.fixture(scope="module")
def server():
    try:
        with postgres_server() as url:
            yield url
    except RuntimeError as e:
        pytest.fail(f"no PostgreSQL server for the tuner's tests: {e}")


@pytest.fixture
def database(server):
    return new_database(server, f"tune_{uuid.uuid4().hex[:12]}")


def open_storage(url, barrier, results):
    barrier.wait()  # all at once, as a Slurm array starts
    try:
        tune.rdb_storage(url, 1, 2, None)
        results.put("ok")
    except Exception as e:  # noqa: BLE001
        results.put(f"{type(e).__name__}: {e}")


def test_workers_that_start_together_on_a_new_database(database):
    """Optuna's RDBStorage alone: most of them die creating the tables (a unique violation on
    pg_type, or DuplicateTable); tune.rdb_storage retries, and all of them open it."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=open_storage, args=(database, barrier, results)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [results.get(timeout=5) for _ in workers] == ["ok"] * 4


def test_two_workers_a_dead_one_and_a_resumed_study(database, tmp_path):
    """Two tuners on one study in a new database, started together; one is killed (SIGKILL) during
    its first trial. Its trial process ends with it; its trial is failed once stale and run again;
    the study holds its budget, each trial told once. A third tuner continues the study."""
    args = ("--storage", database, "--trials", "2", *FAST)
    first, second = start(tmp_path / "a", *args), start(tmp_path / "b", *args)
    lines = []
    read_until(first, "started", lines)
    kids = children(first.pid)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert kids and all(gone(kid) for kid in kids)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, "".join(lines) + out
    storage = optuna.storages.RDBStorage(database)
    done = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    killed = int(lines[-1].split()[1])  # "trial N started"
    assert done[killed].state == TrialState.FAIL
    assert [t for t in done if t.system_attrs.get("failed_trial") == killed][0].params == done[killed].params
    finished = [t.number for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    told = [n for n in range(len(done)) for text in ("".join(lines), out)
            if f"trial {n} complete: " in text or f"trial {n} pruned: " in text]
    assert sorted(told) == finished  # none lost, none told twice

    assert tune.main(tune_args(tmp_path / "c", "--storage", database, "--trials", "3", *FAST)) == 0
    done = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in done) == 3
    assert TrialState.RUNNING not in [t.state for t in done]

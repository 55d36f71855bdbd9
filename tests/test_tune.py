"""benchmark/tune.py on its default storage, SQLite in the study folder: tiny CartPole studies in
process, a worker killed mid-write, bad input, and a full disk."""
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT
from tune_helpers import STUDY, TINY, check_killed_trial_failed_once, start_killed_mid_write, trials

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tune  # noqa: E402

# Optuna calls the heartbeat and its plots experimental; tune.py silences that, pytest resets it per test.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def sqlite(study_dir):
    return f"sqlite:///{study_dir}/study.db"


def test_a_study_runs_continues_and_summarizes(tmp_path, capfd):
    """Three trials, the script's defaults first; the flags given are fixed, not searched; then the
    same command with a larger budget continues the study, and --trials 0 prints its summary."""
    assert tune.main([*TINY, "--trials", "3", "--study-dir", str(tmp_path)]) == 0
    done = trials(sqlite(tmp_path))
    assert [t.state for t in done] == [TrialState.COMPLETE] * 3
    assert done[0].params["learning_rate"] == 3e-4 and done[0].params["gamma"] == 0.999
    assert "num_envs" not in done[1].params and "minibatch_size" not in done[1].params
    assert all(len(t.intermediate_values) == 4 for t in done)  # one evaluation per iteration here
    for name in ("trials.csv", "history.png", "evaluations.png"):
        assert (tmp_path / name).stat().st_size > 0
    out = capfd.readouterr().out
    assert "best: trial" in out and "python ppo_discrete.py --env-id CartPole-v1 --total-timesteps 256" in out

    assert tune.main([*TINY, "--trials", "4", "--study-dir", str(tmp_path)]) == 0
    assert [t.state for t in trials(sqlite(tmp_path))] == [TrialState.COMPLETE] * 4
    capfd.readouterr()
    assert tune.main([*TINY, "--trials", "0", "--study-dir", str(tmp_path)]) == 0
    assert "0 running, 4 complete, 0 pruned, 0 fail, 0 waiting" in capfd.readouterr().out


def test_the_continuous_twin(tmp_path):
    """ppo_continuous.py through the same code: its own flags (--no-norm-reward), its defaults first
    where they lie in the space (its ent_coef of 0 does not: a log range)."""
    import ppo_continuous

    argv = ["ppo_continuous", *TINY[1:], "--env-id", "Pendulum-v1", "--no-norm-reward", "--trials", "1"]
    assert tune.main([*argv, "--study-dir", str(tmp_path)]) == 0
    [trial] = trials(sqlite(tmp_path), name="ppo_continuous-Pendulum-v1")
    assert trial.state == TrialState.COMPLETE and trial.value < 0  # Pendulum's returns are negative
    assert trial.params["learning_rate"] == ppo_continuous.Args.learning_rate and trial.params["ent_coef"] > 0
    assert "--no-norm-reward" in trial.user_attrs["command"]


def test_a_batch_larger_than_the_run_is_that_trials_result(tmp_path, caplog):
    """No sizes given and a short run: the script's defaults (a batch of 16,384 steps) do not fit
    1,024 steps, which prunes that trial, and the study goes on to its end."""
    argv = ["ppo_discrete", "--env-id", "CartPole-v1", "--total-timesteps", "1024", "--update-epochs", "1",
            "--eval-episodes", "2", "--trials", "3", "--study-dir", str(tmp_path)]
    assert tune.main(argv) == 0
    done = trials(sqlite(tmp_path))
    assert done[0].state == TrialState.PRUNED and done[0].params["num_steps"] == 1024
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in done) == 3
    assert "Trial 0 pruned. --total-timesteps 1024 is less than one batch of 16384" in caplog.text  # Optuna's line


def test_two_workers_on_one_sqlite_file(tmp_path):
    """--workers 2: two processes on one SQLite file, their writes and heartbeats queued, the budget
    filled (each worker checks it after its own trial, so one can overshoot by one)."""
    assert tune.main([*TINY, "--trials", "4", "--workers", "2", "--study-dir", str(tmp_path), "--study", "two"]) == 0
    states = [t.state for t in trials(sqlite(tmp_path), name="two")]
    assert set(states) == {TrialState.COMPLETE} and len(states) in (4, 5), states


def test_a_worker_killed_mid_write_then_the_same_command(tmp_path):
    """kill -9 in the middle of a write: SQLite rolls the write back. Run again at once, the study
    finishes; the dead trial, not yet silent long enough at first, is failed before the tuner ends
    (not left RUNNING) and queued once more."""
    argv = [*TINY, "--trials", "2", "--study-dir", str(tmp_path)]
    killed = start_killed_mid_write(*argv)
    out = killed.communicate(timeout=120)[0]
    assert killed.returncode == -9, out
    assert [t.state for t in trials(sqlite(tmp_path))] == [TrialState.RUNNING]
    assert tune.main(argv) == 0
    check_killed_trial_failed_once(trials(sqlite(tmp_path)), budget=2)


@pytest.mark.parametrize("stop, code, message", [
    ("ctrl-c", 130, ""), ("failed elsewhere", 1, "error: Cannot tell a FAIL trial. (run the same command to go on)\n")])
def test_stopped_mid_trial_the_trial_fails_in_one_line(tmp_path, capfd, caplog, monkeypatch, stop, code, message):
    """Ctrl-C, or the trial failed by another worker (as when this one was paused past 3 beats):
    during the trial's first evaluation. The trial is FAIL, the summary written, and the user reads
    Optuna's line that the trial failed and at most one of ours, no traceback."""
    import numpy as np
    import ppo_discrete

    def evaluate(agent, env_id, n_episodes, seed):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        study = optuna.load_study(study_name=STUDY, storage=sqlite(tmp_path))
        study.tell(study.get_trials(states=(TrialState.RUNNING,))[0].number, state=TrialState.FAIL)
        return np.zeros(n_episodes)  # the next report finds the trial failed

    monkeypatch.setattr(ppo_discrete, "evaluate", evaluate)
    assert tune.main([*TINY, "--trials", "1", "--study-dir", str(tmp_path)]) == code
    assert [t.state for t in trials(sqlite(tmp_path))] == [TrialState.FAIL]
    out, err = capfd.readouterr()
    assert "Trial 0 failed with value None." in caplog.text and "Traceback" not in caplog.text + out + err, caplog.text
    assert err.endswith(message) and "1 fail" in out and (tmp_path / "trials.csv").exists(), err


def bad_space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True),
            "gamma": trial.suggest_categorical("gamma", [0.99, 2.0])}


def bad_range(trial):
    return {"ent_coef": trial.suggest_float("ent_coef", 0.0, 0.01, log=True)}


def unknown_name(trial):
    return {"gama": trial.suggest_float("gama", 0.9, 0.99)}


@pytest.mark.parametrize("argv, space, message", [
    (["--gamma", "2"], None, "--gamma must be in [0, 1], got 2.0"),
    (["--target-kl", "nan"], None, "--target-kl must be finite, got nan"),
    (["--learning-rate", "nan"], None, "--learning-rate must be finite"),
    (["--total-timesteps", "0"], None, "--total-timesteps must be positive"),
    (["--num-envs", "two"], None, "argument --num-envs: invalid int value: 'two'"),
    (["--no-such-flag", "3"], None, "unrecognized arguments: --no-such-flag"),
    (["--seed", "3"], None, "unrecognized arguments: --seed"),  # the tuner runs seeds 1..--seeds
    (["--env-id", "NoSuchEnv-v0"], None, "cannot make env 'NoSuchEnv-v0'"),
    (["--env-id", "Pendulum-v1"], None, "(Box actions: ppo_continuous.py)"),
    (["--trials", "-1"], None, "--trials must be 0 or more"),
    (["--workers", "0"], None, "--workers must be positive"),
    ([], bad_space, "sample_params: gamma = 2.0 can never train (--gamma must be in [0, 1], got 2.0)"),
    ([], bad_range, "sample_params: `low > 0` must hold for `log=True`"),
    ([], unknown_name, "sample_params: gama is not a hyperparameter of ppo_discrete.py"),
    (["--storage", "post gres://x"], None, "cannot open the study: Could not parse SQLAlchemy URL"),
    (["--storage", "postgresql://user@host:notaport/db"], None, "cannot open the study: invalid literal"),
    (["--storage", "nosuchdb://x"], None, "cannot open the study: Can't load plugin"),
    (["--storage", "sqlite:////MISSING/study.db"], None, "unable to open database file"),
    (["--storage", "postgresql://user@/db?host=/MISSING"], None, "cannot open the study: (psycopg.OperationalError)"),
    (["--study-dir", "FILE"], None, "cannot open the study: [Errno 17] File exists"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_trial(tmp_path, capfd, monkeypatch, argv, space, message):
    monkeypatch.setattr(tune, "work", lambda cfg: pytest.fail("a trial would start"))
    if space:
        monkeypatch.setattr(tune, "sample_params", space)
    (tmp_path / "file").write_text("")
    argv = [a.replace("MISSING", str(tmp_path / "missing")).replace("FILE", str(tmp_path / "file")) for a in argv]
    tail = [] if "--study-dir" in argv else ["--study-dir", str(tmp_path / "study")]
    with pytest.raises(SystemExit) as exit_info:  # argparse's errors exit from the parser
        raise SystemExit(tune.main([*TINY, *argv, *tail]))
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["file"]  # no study folder, no database


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1 MB file system, mounted here for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_writing_the_summary(tmpfs, tmp_path, capfd):
    """The summary cannot be written: one line and exit 1, and the study (elsewhere) is whole."""
    argv = [*TINY, "--storage", sqlite(tmp_path), "--trials", "1", "--study-dir"]
    assert tune.main([*argv, str(tmp_path / "first")]) == 0
    try:  # fill the disk until a write fails
        with open(tmpfs / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass
    capfd.readouterr()
    assert tune.main([*argv, str(tmpfs)]) == 1  # the budget is met: only the summary is written
    err = capfd.readouterr().err
    assert err.startswith("error: cannot write the summary in ") and "No space left on device" in err, err
    assert err.count("\n") == 1
    assert [t.state for t in trials(sqlite(tmp_path))] == [TrialState.COMPLETE]

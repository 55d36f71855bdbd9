"""benchmark/tune.py on its default storage, a journal file: tiny CartPole studies (a trial is about a
process start-up), the faults a user or the machine can cause, and the parts without training."""
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import ROOT
from tune_helpers import STUDY, children, gone, read_until, start, tune_args

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tune  # noqa: E402

FAST = ["--heartbeat", "1", "--stale-after", "2"]  # a dead worker's trial is stale after 2 s


def trials(study_dir, name=STUDY, storage=None):
    """The study as plain Optuna reads it."""
    storage = JournalStorage(JournalFileBackend(str(storage or study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def states(study_dir):
    return [t.state for t in trials(study_dir)]


def test_two_processes_share_one_study(tmp_path):
    """Two tuners on one journal file fill the budget exactly, each trial told by one of them."""
    first = start(tmp_path, "--trials", "2")
    read_until(first, "trial 0 started")  # the study exists and has a trial running
    second = start(tmp_path, "--trials", "2", "--workers", "2")
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both took part
    assert done[0].params["learning_rate"] == 3e-4  # the script's defaults come first
    assert sorted(n for out in outs for n in range(2) if f"trial {n} complete: " in out) == [0, 1]
    for name in ("summary.md", "best.json", "history.png", "evaluations.png", "trials.csv"):
        assert (tmp_path / name).exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "2 complete" in summary and "python ppo_discrete.py --env-id CartPole-v1" in summary


def test_interrupted_study_continues(tmp_path, capsys):
    """Ctrl-C fails the running trial and writes the summary; the same command finishes the study;
    --trials 0 prints the summary and writes nothing; another search under that name is refused."""
    proc = start(tmp_path, "--trials", "1")
    read_until(proc, "trial 0 started")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the tuner and its trial
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "trial 0 fail: interrupted" in out and (tmp_path / "summary.md").exists()
    assert states(tmp_path) == [TrialState.FAIL]

    assert tune.main(tune_args(tmp_path, "--trials", "1")) == 0
    assert states(tmp_path) == [TrialState.FAIL, TrialState.COMPLETE]
    capsys.readouterr()

    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert tune.main(tune_args(tmp_path, "--trials", "0")) == 0
    assert "1 complete, 0 pruned, 1 fail" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files

    assert tune.main(tune_args(tmp_path, "--trials", "2", "--seeds", "2")) == 2
    err = capsys.readouterr().err
    assert "other settings (runs)" in err and err.count("\n") == 1 and len(states(tmp_path)) == 2


def test_dead_and_paused_workers(tmp_path):
    """kill -9 of a tuner: its trial process gets SIGTERM (PR_SET_PDEATHSIG) and ends, and its trial
    stays RUNNING. A tuner paused (SIGSTOP) mid-trial: its trial goes silent. A third tuner waits for
    both to turn stale, fails them, runs their parameters again and fills the budget. Resumed, the
    paused one says that its trial was taken and exits 1, rather than telling a trial not its own."""
    dead = start(tmp_path, "--trials", "2", *FAST)
    read_until(dead, "trial 0 started")
    kids = children(dead.pid)
    os.kill(dead.pid, signal.SIGKILL)  # the tuner only, not its process group
    dead.communicate()
    assert kids and all(gone(kid) for kid in kids)
    paused = start(tmp_path, "--trials", "2", *FAST)
    read_until(paused, "trial 1 started")
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        assert tune.main(tune_args(tmp_path, "--trials", "2", *FAST)) == 0
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    paused_out = paused.communicate(timeout=120)[0]
    assert paused.returncode == 1 and "trial 1 was failed by another worker" in paused_out, paused_out
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    # Trial 0 is run again (retried once: RetryHeartbeatStaleTrialCallback(max_retry=1)), by the
    # paused tuner if it started after trial 0 turned stale, else by the third.
    again = [t for t in done if t.system_attrs.get("failed_trial") == 0]
    assert again and again[0].params == done[0].params


# --- faults and bad input, in process ------------------------------------------------------------
def fake_runs(monkeypatch, run_once):
    monkeypatch.setattr(tune.Tuner, "run_once", run_once)


def a_run(value=1.0):
    return {"label": "--seed 1", "final": value, "std": 0.0, "solved_step": None, "wall": 0.0, "value": value}


def test_a_trial_that_raises_is_failed_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    def run_once(self, trial, *args):
        if trial.number == 0:
            raise RuntimeError("boom")
        return a_run()

    fake_runs(monkeypatch, run_once)
    assert tune.main(tune_args(tmp_path, "--trials", "1")) == 0
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.COMPLETE]
    assert done[0].user_attrs["reason"] == "RuntimeError: boom"
    assert "trial 0 fail: RuntimeError: boom" in capsys.readouterr().out


def test_failing_trials_stop_the_study(tmp_path, monkeypatch, capsys):
    """A script that exits with an error is a failed trial; --max-failures of them stop the tuner."""
    monkeypatch.setattr(tune.Tuner, "command", lambda self, flags, number: ["-c", "print('no'); raise SystemExit(3)"])
    assert tune.main(tune_args(tmp_path, "--trials", "3", "--max-failures", "2")) == 1
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.FAIL] * 2
    assert "exited with code 3: no" in done[0].user_attrs["reason"]
    assert "stopped after 2 failed trials" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prune-after", "nan"], "--prune-after must lie in [0, 1]"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--heartbeat", "0"], "--heartbeat must be positive"),
    (["--stale-after", "-1"], "--stale-after (-1 s) must be longer"),
    (["--heartbeat", "0.5"], "invalid int value"),
    (["--trials", "-1"], "--trials must be 0 or more"),
    (["--workers", "0"], "--workers must be positive"),
    (["--learning-rate", "-1"], "--learning-rate must be positive"),
    (["--no-such-flag", "3"], "has no flag --no-such-flag"),
    (["--num-envs", "two"], "refuses"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
    (["--num-steps", "512"], "less than one batch"),
    (["--space", "clip_coef=0,0.2"], "--space clip_coef: ppo_discrete.py refuses 0"),
    (["--space", "hidden_size=float:32:64"], "--space hidden_size: ppo_discrete.py refuses"),
    (["--space", "learning_rate=log:0:1"], "need finite LOW < HIGH"),
    (["--space", "nothing=1"], "a hyperparameter of ppo_discrete.py"),
    (["--seed", "3"], "--seed is set by the tuner"),
    (["--also-no-compile", "--compile"], "--compile is set by the tuner"),
    (["--study", ".."], "--study '..'"),
    (["--storage", "MISSING/journal.log"], "its folder does not exist"),
    (["--storage", "post gres://x"], "not a database URL"),
    (["--storage", "postgresql://user@host:notaport/db"], "not a database URL"),
    (["--storage", "nosuchdb://x"], "not a database URL"),
    (["--storage", "sqlite:////MISSING/study.db"], "cannot open the database"),
    (["--trials", "0"], "no study at"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(tune.Tuner, "run", lambda self: pytest.fail("a trial would start"))
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    with pytest.raises(SystemExit) as exit_info:  # argparse's type errors exit from the parser
        raise SystemExit(tune.main(tune_args(tmp_path / "study", *argv)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []  # no study folder, no journal


def test_the_space_must_fit_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune.Tuner, "run", lambda self: pytest.fail("a trial would start"))
    assert tune.main(["ppo_discrete", "--env-id", "CartPole-v1", "--total-timesteps", "40000",
                      "--study-dir", str(tmp_path / "s")]) == 2
    assert "batches of 65,536 steps" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_a_study_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert tune.main(tune_args(tmp_path / "file", "--trials", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the study's files") and err.count("\n") == 1


@pytest.fixture
def tmpfs(tmp_path):
    """A real 300 kB file system, mounted here for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk):
    """Fill the file system until a write fails."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        except OSError:
            pass


def test_a_read_only_study_folder(tmpfs, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert tune.main(tune_args(tmpfs / "study", "--trials", "1")) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and err.count("\n") == 1


def test_a_full_disk_mid_study_never_breaks_the_journal(tmpfs, tmp_path, monkeypatch, capsys):
    """The disk fills during a trial: the tuner stops with one line and exit 1; the journal is still
    whole, and once space is freed the same command fails the lost trial (stale) and goes on."""
    study_dir = tmp_path / "study"
    args = tune_args(study_dir, "--storage", str(tmpfs / "journal.log"), *FAST, "--trials")

    def run_once(self, trial, *a):
        if trial.number == 1:
            fill(tmpfs)  # the user attributes written after the run find no space
        return a_run(trial.number)

    fake_runs(monkeypatch, run_once)
    assert tune.main([*args, "3"]) == 1
    err = capsys.readouterr().err
    assert "error: cannot write the study" in err and "No space left on device" in err
    assert (tmpfs / "journal.log").read_bytes().endswith(b"\n")
    storage = JournalStorage(JournalFileBackend(str(tmpfs / "journal.log")))
    kept = [t.state for t in optuna.load_study(study_name=STUDY, storage=storage).get_trials()]
    assert kept[0] == TrialState.COMPLETE and kept[1] in (TrialState.RUNNING, TrialState.FAIL)  # failed if it fit
    os.unlink(tmpfs / "filler")
    assert tune.main([*args, "3"]) == 0
    done = [t.state for t in trials(study_dir, storage=tmpfs / "journal.log")]
    assert done.count(TrialState.COMPLETE) == 3 and done[1] == TrialState.FAIL and TrialState.RUNNING not in done


def test_a_cut_last_line_is_dropped_not_glued(tmp_path):
    """A writer killed mid-line leaves a line without its end: Optuna's reader skips it, and the next
    append must not glue onto it (plain JournalFileBackend does, and every later line is lost)."""
    path = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=tune.journal_storage(path, 1, 2, None))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"x","trial_id":1,"par')  # the cut line
    study = optuna.load_study(study_name="s", storage=tune.journal_storage(path, 1, 2, None))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    reread = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(path)))
    assert [t.state for t in reread.get_trials()] == [TrialState.COMPLETE] * 3


# --- the parts, without training -----------------------------------------------------------------
class FakeTrial:
    number = 0

    def __init__(self, prune_at=None):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune_at is not None and self.reports[-1][0] >= self.prune_at


def fake_tuner(tmp_path, monkeypatch, lines, *argv):
    """A Tuner whose script is a stand-in that prints `lines` and then sleeps."""
    cfg = tune.make_config(*tune.parse_args(tune_args(tmp_path, "--trials", "1", *argv)))
    os.makedirs(tmp_path / "logs", exist_ok=True)
    program = "import time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + "time.sleep(60)\n"
    tuner = tune.Tuner(cfg, study=None)
    monkeypatch.setattr(tuner, "command", lambda *a: ["-c", program])
    return tuner


def test_pruning_stops_the_process(tmp_path, monkeypatch):
    lines = [f"eval at step {s:,}: {s / 10:.1f} +/- 1.0 over 2 episodes" for s in (64, 128, 192)]
    tuner = fake_tuner(tmp_path, monkeypatch, lines, "--score", "mean-std")
    trial = FakeTrial(prune_at=256 + 125)
    with pytest.raises(tune.Pruned, match="pruned at step 128 of run 1"):
        tuner.run_once(trial, [], ("--seed", "2"), 1, set())  # SIGTERM, not the sleep's end
    # The second run of a trial reports from one run's length on (256); steps snap to the
    # --eval-every-steps grid (25: a tenth of 256); the score is mean - std.
    assert trial.reports == [(256 + 75, 5.4), (256 + 125, 11.8)]


def test_the_objectives(tmp_path, monkeypatch):
    cfg = tune.make_config(*tune.parse_args(tune_args(tmp_path, "--seeds", "2", "--also-no-compile", "--objective",
                                                      "worst")))
    assert cfg.runs == [("--seed", "1"), ("--seed", "2"), ("--seed", "1", "--no-compile"),
                        ("--seed", "2", "--no-compile")]
    values = iter([250.0, 180.0, 240.0, 260.0])
    monkeypatch.setattr(tune.Tuner, "run_once", lambda self, *a: a_run(next(values)))

    class Study:
        def get_trials(self, deepcopy):
            return [optuna.trial.create_trial(state=TrialState.RUNNING)]

    trial = optuna.trial.FixedTrial({"learning_rate": 3e-4, "gamma": 0.99, "gae_lambda": 0.95, "ent_coef": 0.01,
                                     "clip_coef": 0.2, "hidden_size": 64, "update_epochs": 1})
    assert tune.Tuner(cfg, Study()).run_trial(trial) == 180.0
    cfg.objective, values = "mean", iter([250.0, 180.0, 240.0, 260.0])
    assert tune.Tuner(cfg, Study()).run_trial(trial) == 232.5


def test_search_space_and_flags(tmp_path):
    assert tune.parse_spec("lr", "log:1e-4:1e-3") == tune.Param("log", 1e-4, 1e-3)
    assert tune.parse_spec("e", "int:1:10") == tune.Param("int", 1, 10)
    assert tune.parse_spec("g", "0.99,0.999") == tune.Param("choice", choices=(0.99, 0.999))
    assert tune.parse_spec("g", "0.99") == 0.99
    cfg = tune.make_config(*tune.parse_args(["ppo_discrete", "--num-envs", "8", "--space", "gamma=0.99",
                                             "--space", "update_epochs=3,5", "--study-dir", str(tmp_path)]))
    assert "num_envs" not in cfg.space and "gamma" not in cfg.space  # given: fixed, not searched
    assert cfg.space["update_epochs"] == tune.Param("choice", choices=(3, 5))
    assert cfg.fixed_flags[:2] == ["--num-envs", "8"] and ["--gamma", "0.99"] == cfg.fixed_flags[2:4]
    assert tune.param_flags({"num_steps": 256, "minibatch_size": 64, "learning_rate": 0.000123456}, cfg.base) == [
        "--num-steps", "256", "--learning-rate", "0.0001235", "--num-minibatches", "32"]
    # 8 x 125 = 1,000 steps do not split into 15 minibatches of about 64: 10 of 100 do
    assert tune.param_flags({"num_steps": 125, "minibatch_size": 64}, cfg.base)[-1] == "10"
    assert json.loads(json.dumps(tune.identity(cfg)))["runs"] == [["--seed", "1"]]

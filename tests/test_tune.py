"""benchmark/tune.py: tiny Optuna studies on CartPole-v1 (a few seconds of training each)."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tune  # noqa: E402

TUNE = os.path.join(ROOT, "benchmark", "tune.py")
# Four 64-step iterations, an evaluation after each, 2 episodes: a trial is a process start-up.
TINY = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
        "--update-epochs", "1", "--total-timesteps", "256", "--eval-episodes", "2", "--periodic-eval-episodes", "2"]
STUDY = "ppo_discrete-CartPole-v1"


def tune_args(study_dir, *extra):
    return ["ppo_discrete", *TINY, "--study-dir", str(study_dir), *extra]


def start(study_dir, *extra):
    """The tuner as a process in its own group, as a terminal or a batch system would start it."""
    return subprocess.Popen([sys.executable, TUNE, *tune_args(study_dir, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)


def read_until(proc, text):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n{''.join(lines)}")


def trials(study_dir, name=STUDY):
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def states(study_dir):
    return [t.state for t in trials(study_dir)]


def test_two_processes_share_one_study(tmp_path):
    """Two tuners on one journal file (one with two workers) fill the budget exactly."""
    first = start(tmp_path, "--trials", "4")
    read_until(first, "trial 0 started")  # the study exists and has a trial running
    second = start(tmp_path, "--trials", "4", "--workers", "2")
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both took part
    assert done[0].params["learning_rate"] == 3e-4  # the script's defaults come first
    for name in ("summary.md", "best.json", "history.png"):
        assert (tmp_path / name).exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "4 complete" in summary and "python ppo_discrete.py --env-id CartPole-v1" in summary


def test_interrupted_study_continues(tmp_path):
    """Ctrl-C fails the running trial and writes the summary; kill -9 leaves a trial running,
    which the next start marks failed; the study then fills its budget."""
    proc = start(tmp_path, "--trials", "1")
    read_until(proc, "trial 0 started")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the tuner and its trial
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "trial 0 interrupted" in out and (tmp_path / "summary.md").exists()
    assert states(tmp_path) == [TrialState.FAIL]

    proc = start(tmp_path, "--trials", "1")
    read_until(proc, "trial 1 started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert states(tmp_path) == [TrialState.FAIL, TrialState.RUNNING]

    proc = start(tmp_path, "--trials", "1")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "trial 1 of" in out and "recorded as failed" in out
    assert states(tmp_path) == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]

    # Another search under the same name is refused, before any trial.
    out = subprocess.run([sys.executable, TUNE, *tune_args(tmp_path, "--trials", "2", "--seeds", "2")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "other settings (seeds)" in out.stderr
    assert len(states(tmp_path)) == 3


def test_a_trial_that_raises_is_failed_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    run_seed = tune.Tuner.run_seed

    def faulty(self, trial, *args):
        if trial.number == 0:
            raise RuntimeError("boom")
        return run_seed(self, trial, *args)

    monkeypatch.setattr(tune.Tuner, "run_seed", faulty)
    assert tune.main(tune_args(tmp_path, "--trials", "1")) == 0
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.COMPLETE]
    assert done[0].user_attrs["reason"] == "RuntimeError: boom"
    assert "trial 0 failed: RuntimeError: boom" in capsys.readouterr().out


def test_failing_trials_stop_the_study(tmp_path, capsys):
    """A script that exits with an error is a failed trial; --max-failures of them stop the tuner."""
    assert tune.main(tune_args(tmp_path, "--trials", "3", "--max-failures", "2", "--env-id", "Pendulum-v1")) == 1
    done = trials(tmp_path, "ppo_discrete-Pendulum-v1")
    assert [t.state for t in done] == [TrialState.FAIL] * 2
    assert "exited with code 2" in done[0].user_attrs["reason"]


# --- the parts, without training ------------------------------------------------------------------
def fake_seed(tmp_path, monkeypatch, lines, **cfg_changes):
    """Tuner.run_seed on a stand-in script that prints `lines` and then sleeps."""
    cfg = tune.make_config(*tune.parse_args(tune_args(tmp_path, "--trials", "1")))
    cfg = tune.dataclasses.replace(cfg, **cfg_changes)
    os.makedirs(tmp_path / "logs", exist_ok=True)
    program = "import time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + "time.sleep(60)\n"
    tuner = tune.Tuner(cfg, study=None)
    monkeypatch.setattr(tuner, "command", lambda *a: [sys.executable, "-c", program])
    return tuner


class FakeTrial:
    number = 0

    def __init__(self, prune_at=None):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune_at is not None and self.reports[-1][0] >= self.prune_at


def test_pruning_stops_the_process(tmp_path, monkeypatch):
    lines = [f"eval at step {s:,}: {s / 10:.1f} +/- 1.0 over 2 episodes" for s in (64, 128, 192)]
    tuner = fake_seed(tmp_path, monkeypatch, lines)
    trial = FakeTrial(prune_at=125)
    begin = time.perf_counter()
    with pytest.raises(tune.Pruned, match="pruned at step 128 of seed 1"):
        tuner.run_seed(trial, [], 1, 0)
    assert time.perf_counter() - begin < 30  # SIGTERM, not the sleep's end
    # Steps snap to the --eval-every-steps grid (25 here: a tenth of 256), so trials with other
    # batch sizes are compared at the same steps.
    assert trial.reports == [(75, 6.4), (125, 12.8)]


def test_the_steps_objective_stops_at_the_target(tmp_path, monkeypatch):
    lines = ["eval at step 1,000: 50.0 +/- 1.0 over 2 episodes", "eval at step 2,000: 210.0 +/- 1.0 over 2 episodes"]
    tuner = fake_seed(tmp_path, monkeypatch, lines, objective="steps", target=200.0, eval_every_steps=1000)
    trial = FakeTrial()
    result = tuner.run_seed(trial, [], 3, 1)
    assert (result.value, result.solved_step, result.final) == (2000.0, 2000, None)
    # The study minimizes, so the evaluations are reported negated; seed index 1 is offset by one run.
    assert trial.reports == [(1256, -50.0), (2256, -210.0)]


def test_search_space_and_flags(tmp_path):
    assert tune.parse_spec("lr", "log:1e-4:1e-3") == tune.Param("log", 1e-4, 1e-3)
    assert tune.parse_spec("e", "int:1:10") == tune.Param("int", 1, 10)
    assert tune.parse_spec("g", "0.99,0.999") == tune.Param("choice", choices=(0.99, 0.999))
    assert tune.parse_spec("g", "0.99") == 0.99
    with pytest.raises(ValueError):
        tune.parse_spec("lr", "log:0:1")

    cfg = tune.make_config(*tune.parse_args(["ppo_discrete", "--num-envs", "8", "--space", "gamma=0.99",
                                             "--space", "update_epochs=3,5", "--study-dir", str(tmp_path)]))
    assert "num_envs" not in cfg.space and "gamma" not in cfg.space  # given: fixed, not searched
    assert cfg.space["update_epochs"] == tune.Param("choice", choices=(3, 5))
    assert cfg.fixed_flags[:2] == ["--num-envs", "8"] and ["--gamma", "0.99"] == cfg.fixed_flags[2:4]
    assert tune.param_flags({"num_steps": 256, "minibatch_size": 64, "learning_rate": 0.000123456}, cfg.base) == [
        "--num-steps", "256", "--learning-rate", "0.0001235", "--num-minibatches", "32"]
    assert cfg.eval_every_iters(["--num-envs", "8", "--num-steps", "256"]) == 98  # 200,000 / 2,048

    for argv, message in [(["--seed", "3"], "set by the tuner"), (["--objective", "steps"], "needs --target"),
                          (["--space", "nothing=1"], "a hyperparameter"), (["--workers", "0"], "positive")]:
        with pytest.raises(ValueError, match=message):
            tune.make_config(*tune.parse_args(["ppo_discrete", *argv]))

"""The harness (section 8) as a user meets it: the run folder, TensorBoard, checkpoints, resume,
evaluation, bad input and real faults. Each fault ends in one line on stderr and a known exit
code, with the last good checkpoint intact. The harness is the same text in both scripts
(tests/test_twins.py), so what does not depend on the action space runs on ppo_discrete only.

Real faults where the machine allows: a small tmpfs for a full disk and a read-only mount (as
root), signals to a subprocess. main() runs in this process elsewhere, with a user's flags."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST_ENV, OTHER_KIND_ENV, ROOT, only_run_dir, ppo_continuous, ppo_discrete, run_main, tiny

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.fixture
def mounts():
    mounted = []

    def mount(path, size="4m"):
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


# ---- a run, as the README promises it ------------------------------------------------------------
def test_a_run_writes_its_folder_tensorboard_checkpoint_and_evaluation(script, tmp_path, capsys):
    assert run_main(script, tiny(script, "--exp-name", "smoke", "--seed", "3"), tmp_path) == 0
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith(f"{FAST_ENV[script.__name__]}__smoke__3__")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["global_step"] == 128 and len(evaluation["returns"]) == 2
    assert evaluation["mean"] == pytest.approx(sum(evaluation["returns"]) / 2)
    data = script.load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert (data["script"], data["global_step"], data["iteration"]) == (script.__name__, 128, 2)
    ended = ["charts/episodic_return"] if script is ppo_discrete else []  # Pendulum's episodes take 200 steps
    for tag in (*ended, "charts/SPS", "charts/learning_rate", "losses/policy_loss",
                "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance"):
        assert scalars(run_dir, tag), tag
    assert [step for step, _ in scalars(run_dir, "charts/learning_rate")] == [64, 128]
    out = capsys.readouterr().out
    assert "step        128/128" in out and "evaluation: " in out and str(run_dir) in out


def test_the_checkpoint_carries_what_the_agent_normalizes_with(tmp_path):
    run_main(ppo_continuous, tiny(ppo_continuous), tmp_path)
    model = ppo_continuous.load_checkpoint(str(only_run_dir(tmp_path) / "checkpoint.pt"))["model"]
    assert model["obs_rms.count"] > 100 and model["return_rms.count"] > 100  # both were updated


@pytest.mark.parametrize("argv, says", [
    (["--gamma", "2"], "--gamma must be in [0, 1]"),
    (["--learning-rate", "nan"], "--learning-rate must be finite"),
    (["--num-minibatches", "3"], "equal minibatches"),
    (["--total-timesteps", "10"], "less than one batch"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env"),
    (["--resume", "a.pt", "--eval-checkpoint", "b.pt"], "not both"),
    (["--resume", "missing.pt"], "cannot read missing.pt"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(script, tmp_path, capsys, argv, says):
    assert run_main(script, tiny(script, *argv), tmp_path) == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_env_of_the_other_kind_names_the_other_script(script, tmp_path, capsys):
    assert run_main(script, [*tiny(script), "--env-id", OTHER_KIND_ENV[script.__name__]], tmp_path) == 2
    other = ppo_continuous if script is ppo_discrete else ppo_discrete
    assert f"{other.__name__}.py" in one_line_error(capsys)


# ---- checkpoints and resume ----------------------------------------------------------------------
class Killed(Exception):
    """Stands for kill -9 at a chosen moment: nothing after it runs."""


def test_resume_continues_from_the_checkpoint_and_tensorboard_forgets_what_came_after(tmp_path, monkeypatch, capsys):
    script, real_save = ppo_discrete, ppo_discrete.Harness.save

    def save(self, name):
        if self.global_step == 256:  # the checkpoint of step 128 is the last one written
            raise Killed()
        real_save(self, name)

    monkeypatch.setattr(script.Harness, "save", save)
    with pytest.raises(Killed):
        run_main(script, tiny(script, "--total-timesteps", "256", "--checkpoint-every", "2"), tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert [s for s, _ in scalars(run_dir, "charts/learning_rate")] == [64, 128, 192, 256]
    assert script.load_checkpoint(str(run_dir / "checkpoint.pt"))["global_step"] == 128
    monkeypatch.setattr(script.Harness, "save", real_save)
    assert script.main(["--resume", str(run_dir / "checkpoint.pt")]) == 0
    assert "step        256/256" in capsys.readouterr().out
    # Steps 192 and 256 were logged twice: TensorBoard keeps only the resumed run's.
    assert [s for s, _ in scalars(run_dir, "charts/learning_rate")] == [64, 128, 192, 256]
    assert json.loads((run_dir / "evaluation.json").read_text())["global_step"] == 256
    # Finished: a second --resume says so; more steps train on, in the same folder.
    assert script.main(["--resume", str(run_dir / "checkpoint.pt")]) == 2
    assert "finished" in one_line_error(capsys)
    assert script.main(["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "320"]) == 0
    assert script.load_checkpoint(str(run_dir / "checkpoint.pt"))["global_step"] == 320


def test_resume_keeps_the_runs_own_flags(tmp_path, capsys):
    script = ppo_discrete
    run_main(script, tiny(script, "--gamma", "0.9"), tmp_path)
    checkpoint = str(only_run_dir(tmp_path) / "checkpoint.pt")
    assert script.main(["--resume", checkpoint, "--learning-rate", "0.1"]) == 2
    assert "--learning-rate" in one_line_error(capsys)
    capsys.readouterr()
    assert script.main(["--eval-checkpoint", checkpoint, "--eval-episodes", "3"]) == 0
    assert "over 3 episodes" in capsys.readouterr().out  # the run's gamma and env came with it


def test_a_checkpoint_that_is_not_this_scripts_is_refused_in_one_line(tmp_path, capsys):
    run_main(ppo_continuous, tiny(ppo_continuous), tmp_path)
    checkpoint = only_run_dir(tmp_path) / "checkpoint.pt"
    assert ppo_discrete.main(["--eval-checkpoint", str(checkpoint)]) == 2
    assert "not a checkpoint of ppo_discrete.py but of ppo_continuous.py" in one_line_error(capsys)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert ppo_discrete.main(["--resume", str(tmp_path / "notes.pt")]) == 2
    assert "cannot read" in one_line_error(capsys)


@pytest.mark.parametrize("damage", ["shapes", "entries", "nan"])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys, damage):
    script = ppo_discrete
    run_main(script, tiny(script), tmp_path)
    path = only_run_dir(tmp_path) / "checkpoint.pt"
    data = torch.load(path, weights_only=True)
    if damage == "shapes":
        data["model"]["actor.0.weight"] = torch.zeros(3, 3)
    elif damage == "entries":
        del data["optimizer"]
    else:
        data["model"]["critic.0.bias"][0] = math.nan
    torch.save(data, path)
    assert script.main(["--resume", str(path), "--total-timesteps", "256"]) == 2
    assert "does not fit" in one_line_error(capsys)


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    script, real_update = ppo_discrete, ppo_discrete.update
    calls = []

    def update(**kwargs):
        calls.append(1)
        losses = real_update(**kwargs)
        return {**losses, "value_loss": math.nan} if len(calls) == 3 else losses

    monkeypatch.setattr(script, "update", update)
    assert run_main(script, tiny(script, "--total-timesteps", "256", "--checkpoint-every", "1"), tmp_path) == 1
    err = one_line_error(capsys)
    assert "diverged" in err and "checkpoint.pt (step 128) is intact" in err
    assert script.load_checkpoint(str(only_run_dir(tmp_path) / "checkpoint.pt"))["global_step"] == 128


def test_periodic_evaluations_keep_the_best_and_stop_at_the_target(tmp_path, capsys):
    script = ppo_discrete
    assert run_main(script, tiny(script, "--total-timesteps", "512", "--target-return", "1"), tmp_path) == 0
    run_dir = only_run_dir(tmp_path)
    out = capsys.readouterr().out
    assert "eval at step 64: " in out and "--target-return 1.0 reached at step 64" in out
    assert script.load_checkpoint(str(run_dir / "checkpoint.pt"))["global_step"] == 64
    best = script.load_checkpoint(str(run_dir / "best.pt"))
    assert best["global_step"] == 64 and best["best_eval"] == scalars(run_dir, "eval/mean_return")[0][1]


def test_eval_checkpoint_records_videos_beside_the_checkpoint(tmp_path, capsys):
    script = ppo_discrete
    run_main(script, tiny(script), tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert script.main(["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--capture-video",
                        "--eval-episodes", "2"]) == 0
    assert list((run_dir / "videos" / "eval_checkpoint").glob("*.mp4"))


# ---- real faults ---------------------------------------------------------------------------------
@AS_ROOT
def test_a_full_disk_stops_training_in_one_line(tmp_path, mounts, capsys):
    script, disk = ppo_discrete, mounts(tmp_path / "disk", size="120k")
    code = script.main([*tiny(script, "--total-timesteps", "1024", "--checkpoint-every", "1"), "--runs-dir", str(disk)])
    err = one_line_error(capsys)
    assert code == 1 and "No space left on device" in err, err
    intact = err.split("; ")[-1]
    if "is intact" in intact:  # a checkpoint made it before the disk filled: it loads
        step = script.load_checkpoint(intact.split(" (step")[0])["global_step"]
        assert f"(step {step:,})" in intact


@AS_ROOT
def test_a_read_only_run_folder_is_one_line_for_the_evaluation_and_its_videos(tmp_path, mounts, capsys):
    script = ppo_discrete
    run_main(script, tiny(script), tmp_path)
    run_dir = mounts(tmp_path / "ro")
    shutil.copy(only_run_dir(tmp_path) / "checkpoint.pt", run_dir)  # trained, not evaluated
    read_only(run_dir)
    assert script.main(["--resume", str(run_dir / "checkpoint.pt")]) == 1
    err = one_line_error(capsys)
    assert "evaluation.json (Read-only file system)" in err and "(step 128) is intact" in err
    assert script.main(["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--capture-video"]) == 1
    assert "Read-only file system" in one_line_error(capsys)


# ---- the command line, in a process of its own ----------------------------------------------------
def cli(script, argv, cwd, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_help_lists_every_flag_and_a_bad_flag_is_one_line(tmp_path):
    out, _ = cli(ppo_discrete, ["--help"], tmp_path).communicate(timeout=60)
    assert all(flag in out for flag in ("--env-id", "--total-timesteps", "--resume", "--eval-checkpoint", "--no-compile"))
    proc = cli(ppo_discrete, ["--gamma", "2"], tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err == "error: --gamma must be in [0, 1], got 2.0\n"
    assert os.listdir(tmp_path) == []  # importing and refusing wrote nothing


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits(tmp_path, signum):
    argv = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
            "--update-epochs", "1", "--total-timesteps", "100000", "--checkpoint-every", "1"]
    proc = cli(ppo_discrete, argv, tmp_path)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "runs").glob("*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "checkpoint saved. Resume with" in err and "Traceback" not in err
    checkpoint = next((tmp_path / "runs").glob("*/checkpoint.pt"))
    step = ppo_discrete.load_checkpoint(str(checkpoint))["global_step"]
    assert f"stopped at step {step:,}" in err and 0 < step < 100000

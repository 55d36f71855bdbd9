"""End to end: tiny training runs, checkpoints, resume, evaluation, and bad input."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FAST_ENV, OTHER_KIND_ENV, ROOT, TINY, only_run_dir, run_main, tiny, train_tiny



def test_tiny_run_writes_events_checkpoint_and_evaluation(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path)
    files = os.listdir(run_dir)
    assert any(f.startswith("events.out.tfevents") for f in files)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 128 and ckpt["iteration"] == 2
    assert not [f for f in files if ".tmp" in f]  # atomic writes leave no temp file behind
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert len(evaluation["returns"]) == 2
    out = capsys.readouterr().out
    assert "step        128/128" in out and "evaluation:" in out


def test_default_env_trains(script, tmp_path):
    """The default env (Lunar Lander) end to end, with a periodic evaluation and best.pt."""
    assert run_main(script, [*TINY, "--eval-every", "1", "--periodic-eval-episodes", "1"], tmp_path) == 0
    run_dir = only_run_dir(tmp_path)
    assert {"checkpoint.pt", "best.pt", "evaluation.json"} <= set(os.listdir(run_dir))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["env_id"].startswith("LunarLander")


def test_tensorboard_tags(script, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 256 steps per env: long enough for a Pendulum episode (200) to end and be logged
    run_dir = train_tiny(script, tmp_path, "--eval-every", "2", "--periodic-eval-episodes", "1",
                         "--num-steps", "128", "--total-timesteps", "512")
    tags = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl",
                "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance", "eval/mean_return"}
    assert expected <= tags


def test_same_seed_gives_identical_weights(script, tmp_path):
    weights = []
    for i in range(2):
        run_dir = train_tiny(script, tmp_path / str(i))
        weights.append(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = train_tiny(script, tmp_path / "other", "--seed", "2")
    other = torch.load(other / "checkpoint.pt", weights_only=True)["model"]
    assert not all(torch.equal(weights[0][k], other[k]) for k in other)


def test_eval_checkpoint_reproduces_the_final_evaluation(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path, "--eval-episodes", "3")
    final = json.loads((run_dir / "evaluation.json").read_text())
    capsys.readouterr()
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "3"], tmp_path) == 0
    out = capsys.readouterr().out
    assert f"evaluation: {final['mean']:.1f} +/- {final['std']:.1f} over 3 episodes" in out
    ckpt = script.load_checkpoint(str(run_dir / "checkpoint.pt"))
    args = script.RunArgs(**ckpt["args"])
    again = script.evaluate(script.agent_from_checkpoint(ckpt), args.env_id, 3, script.eval_seed(args))
    assert again.tolist() == final["returns"]  # episode by episode
    assert len(os.listdir(tmp_path / "runs")) == 1  # evaluating starts no new run


def test_resume_continues_the_same_run(script, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_tiny(script, tmp_path, "--eval-every", "1", "--periodic-eval-episodes", "1")
    before = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert run_main(script, ["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "256"], tmp_path) == 0
    after = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(os.listdir(tmp_path / "runs")) == 1  # same run directory
    assert (after["global_step"], after["iteration"]) == (256, 4)
    assert after["args"]["total_timesteps"] == 256  # given explicitly: overrides the checkpoint
    assert after["args"]["num_steps"] == 32  # the checkpoint's hyperparameters, not the defaults
    assert after["args"]["eval_every"] == 1  # and its run-control flags
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("losses/value_loss")] == [64, 128, 192, 256]
    assert [e.step for e in events.Scalars("eval/mean_return")] == [64, 128, 192, 256]
    assert after["optimizer"]["state"][0]["step"] > before["optimizer"]["state"][0]["step"]
    assert not all(torch.equal(before["model"][k], after["model"][k]) for k in after["model"])


def test_capture_video_writes_mp4(script, tmp_path):
    run_dir = train_tiny(script, tmp_path, "--capture-video", "--eval-episodes", "1")
    for phase in ("train", "eval"):
        videos = [f for f in os.listdir(run_dir / "videos" / phase) if f.endswith(".mp4")]
        assert videos and all((run_dir / "videos" / phase / v).stat().st_size > 1000 for v in videos)


def test_checkpoint_write_is_atomic(script, tmp_path, monkeypatch):
    run_dir = train_tiny(script, tmp_path)
    good = (run_dir / "checkpoint.pt").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(script.torch, "save", broken_save)
    monkeypatch.setattr(script.os, "replace", lambda *a: pytest.fail("renamed after a failed write"))
    agent = script.agent_from_checkpoint(script.load_checkpoint(str(run_dir / "checkpoint.pt")))
    with pytest.raises(OSError):
        script.save_checkpoint(str(run_dir / "checkpoint.pt"), agent=agent, optimizer=torch.optim.Adam(agent.parameters()),
                               args=script.RunArgs(), progress=script.Progress(), resumable=True)
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert sorted(os.listdir(run_dir)) == sorted(f for f in os.listdir(run_dir) if ".tmp" not in f)


# ------------------------------------------------------------------ bad input: one line, exit 2
def test_env_of_the_other_action_kind_points_to_the_twin(script, tmp_path, capsys):
    assert run_main(script, [*TINY, "--env-id", OTHER_KIND_ENV[script.__name__]], tmp_path) == 2
    twin = "ppo_continuous.py" if script.__name__ == "ppo_discrete" else "ppo_discrete.py"
    assert f"use {twin}" in capsys.readouterr().err


def bad_checkpoints(script, tmp_path):
    run_dir = train_tiny(script, tmp_path / "good")
    good = run_dir / "checkpoint.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    twin = tmp_path / "twin.pt"
    data = torch.load(good, weights_only=True)
    data["script"] = "ppo_continuous" if script.__name__ == "ppo_discrete" else "ppo_discrete"
    torch.save(data, twin)
    return [(tmp_path / "missing.pt", "does not exist"), (truncated, "not a readable checkpoint"),
            (text, "not a readable checkpoint"), (foreign, f"not a checkpoint of {script.__name__}.py"),
            (twin, "use that script")], good


@pytest.mark.parametrize("flag", ["--eval-checkpoint", "--resume"])
def test_bad_checkpoints_exit_2_with_one_line(script, tmp_path, capsys, flag):
    cases, good = bad_checkpoints(script, tmp_path)
    before = good.read_bytes()
    for path, message in cases:
        capsys.readouterr()
        assert run_main(script, [flag, str(path)], tmp_path) == 2, path
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # A checkpoint whose shapes do not fit the env asked for.
    other_env = {"ppo_discrete": "Acrobot-v1", "ppo_continuous": "LunarLanderContinuous-v3"}[script.__name__]
    assert run_main(script, [flag, str(good), "--env-id", other_env], tmp_path) == 2
    assert "use the env it was trained on" in capsys.readouterr().err
    assert run_main(script, [flag, str(good), "--hidden-size", "32"], tmp_path) == 2
    assert "hidden layers of 64" in capsys.readouterr().err
    assert good.read_bytes() == before


def test_resume_refuses_best_pt(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path, "--eval-every", "1", "--periodic-eval-episodes", "1")
    assert run_main(script, ["--resume", str(run_dir / "best.pt")], tmp_path) == 2
    assert "is a snapshot (best.pt or a copy of one)" in capsys.readouterr().err


def test_explicit_flags(script):
    given = script.explicit_flags(["--seed", "3", "--no-anneal-lr", "--gamma=0.9", "--eval-checkpoint", "x.pt"])
    assert given == {"seed", "anneal_lr", "gamma", "eval_checkpoint"}


@pytest.mark.parametrize("n_episodes", [7, 30])
def test_evaluate_plays_exactly_the_episodes_asked_for(script, n_episodes):
    env_id = FAST_ENV[script.__name__]
    obs_dim, n_act = script.env_shapes(env_id)
    torch.manual_seed(0)
    agent = script.Agent(obs_dim, n_act)
    returns = script.evaluate(agent, env_id, n_episodes, seed=5, max_envs=25)
    assert len(returns) == n_episodes
    np.testing.assert_array_equal(returns, script.evaluate(agent, env_id, n_episodes, seed=5, max_envs=25))


def test_a_new_run_never_writes_into_an_existing_run_dir(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script.time, "strftime", lambda fmt: "20260101-000000")
    run_dir = train_tiny(script, tmp_path)
    before = {f: (run_dir / f).stat().st_mtime_ns for f in os.listdir(run_dir)}
    assert run_main(script, tiny(script), tmp_path) == 0  # the same flags in the same second: a run of its own
    assert sorted(os.listdir(tmp_path / "runs")) == [run_dir.name, run_dir.name + "-2"]
    assert {f: (run_dir / f).stat().st_mtime_ns for f in os.listdir(run_dir)} == before


# ------------------------------------------------------------------ as a user runs it
def run_cli(script, *argv, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), *argv],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_help_lists_the_flags(script):
    result = run_cli(script, "--help")
    assert result.returncode == 0
    for flag in ("--env-id", "--total-timesteps", "--resume", "--eval-checkpoint", "--capture-video"):
        assert flag in result.stdout


def test_cli_error_is_one_line_without_traceback(script, tmp_path):
    result = run_cli(script, "--gamma", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: --gamma must lie in [0, 1], got 2.0\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_a_checkpoint_and_prints_how_to_resume(script, tmp_path, signum):
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, f"{script.__name__}.py"),
                             "--env-id", FAST_ENV[script.__name__], "--total-timesteps", "100000000",
                             "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
                             "--print-every", "0", "--checkpoint-every", "1000000", "--no-compile"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(script.__name__)  # the start-up line
    assert proc.stdout.readline().startswith("step")  # training is under way
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert "Traceback" not in err and "--resume" in err
    run_dir = only_run_dir(tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # the partial rollout in flight was dropped: whole iterations of 2 envs x 32 steps only
    assert ckpt["global_step"] > 0 and ckpt["global_step"] == ckpt["iteration"] * 64


def test_import_is_side_effect_free(script, tmp_path):
    # Both ways people load a script: as a module, and by path without registering it.
    path = os.path.join(ROOT, f"{script.__name__}.py")
    code = (f"import sys, importlib.util; sys.argv = ['x', '--bogus']; import {script.__name__}; "
            f"spec = importlib.util.spec_from_file_location('copy', {path!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); print('ok')")
    # The slow imports (tyro, TensorBoard) wait until a run needs them.
    code += "; print(sorted(m for m in ('tyro', 'torch.utils.tensorboard') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert result.stdout == "ok\n[]\n" and result.stderr == ""
    assert os.listdir(tmp_path) == []


def test_target_kl_stops_the_epochs_early(script, tmp_path):
    # 2 iterations x 2 epochs x 2 minibatches = 8 gradient steps; a tiny target KL stops each
    # iteration after its first epoch: 4.
    for target, steps in ((None, 8), (1e-12, 4)):
        extra = [] if target is None else ["--target-kl", str(target)]
        run_dir = train_tiny(script, tmp_path / str(target), *extra)
        optimizer = torch.load(run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
        assert optimizer["state"][0]["step"].item() == steps

"""Nothing lost, nothing silent: bad flags, divergence, damaged checkpoints, planted symlinks,
I/O faults and interrupts each end in one line and a known exit code, never in a traceback or a
lost checkpoint."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import FAST_ENV, ROOT, TINY, only_run_dir, run_main, tiny, train_tiny



def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ flags that cannot train (one line, exit 2)
UNTRAINABLE = [
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--num-steps", "-3"], "--num-steps must be positive"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--num-minibatches", "3"], "does not split into 3 equal minibatches"),
    (["--total-timesteps", "10"], "less than one batch"),
    (["--gamma", "1.5"], "--gamma must lie in [0, 1]"),
    (["--gae-lambda", "-0.1"], "--gae-lambda must lie in [0, 1]"),
    (["--num-envs", "1", "--num-steps", "4", "--num-minibatches", "4"], "cannot normalize advantages"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["--ent-coef", "nan"], "--ent-coef must be a finite number"),
    (["--vf-coef", "nan"], "--vf-coef must be a finite number"),
    (["--gamma", "nan"], "--gamma must be a finite number"),
    (["--seed", "-1"], "--seed must lie in [0, 2^31)"),
    (["--seed", "99999999999"], "--seed must lie in [0, 2^31)"),
    (["--num-steps", "1000000000", "--total-timesteps", "4000000000"], "GiB, more than the"),
    (["--hidden-size", "100000"], "GiB, more than the"),
    (["--exp-name", "../escape"], "--exp-name must be a plain name"),
    (["--exp-name", "a/b"], "--exp-name must be a plain name"),
    (["--target-kl", "-1"], "--target-kl must be positive"),
    (["--ent-coef", "-0.1"], "--ent-coef must be 0 or more"),
    (["--env-id", "phys2d/CartPole-v1"], "cannot make env 'phys2d/CartPole-v1'"),  # needs jax
]


@pytest.mark.parametrize("flags,message", UNTRAINABLE, ids=[" ".join(f) for f, _ in UNTRAINABLE])
def test_untrainable_flags_are_refused_before_anything_is_written(script, tmp_path, capsys, flags, message):
    assert run_main(script, [*TINY, *flags], tmp_path) == 2
    assert message in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "runs")


def test_log_std_init_must_be_finite(tmp_path, capsys):
    from conftest import ppo_continuous

    assert run_main(ppo_continuous, [*TINY, "--log-std-init", "nan"], tmp_path) == 2
    assert "--log-std-init must be a finite number" in one_error_line(capsys)


def test_a_slash_in_the_env_id_makes_no_subfolder(script, tmp_path):
    if script.__name__ == "ppo_discrete":
        name = "tests_ns/Flat-v0"
        if name not in gym.registry:
            gym.register(name, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv", max_episode_steps=50)
    else:
        name = "tests_ns/FlatBox-v0"
        if name not in gym.registry:
            gym.register(name, entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv", max_episode_steps=50)
    assert run_main(script, [*TINY, "--env-id", name], tmp_path) == 0
    assert only_run_dir(tmp_path).name.startswith("tests_ns-Flat")


class OffsetActions(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(3, start=1)

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


@pytest.mark.parametrize("env_id,message", [("FrozenLake-v1", "neither script takes them"),
                                            ("TestsOffsetActions-v0", "numbers its")])
def test_envs_neither_script_takes_are_refused_without_pointing_to_the_twin(script, tmp_path, capsys, env_id, message):
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=OffsetActions)
    assert run_main(script, [*TINY, "--env-id", env_id], tmp_path) == 2
    err = one_error_line(capsys)
    assert message in err and "use ppo_" not in err


# ------------------------------------------------------------------ divergence
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(script, tmp_path, capsys, monkeypatch):
    real_loss, calls = script.ppo_loss, []

    def loss_that_blows_up(**kwargs):  # 2 iterations x 2 epochs x 2 minibatches fine, then NaN
        calls.append(1)
        loss, parts = real_loss(**kwargs)
        return (loss * math.nan if len(calls) > 8 else loss), parts

    monkeypatch.setattr(script, "ppo_loss", loss_that_blows_up)
    argv = tiny(script, "--total-timesteps", "256", "--checkpoint-every", "1", "--eval-every", "1",
                "--periodic-eval-episodes", "1")
    assert run_main(script, argv, tmp_path) == 1
    err = one_error_line(capsys)
    assert "diverged in the iteration after step 128" in err and "lower --learning-rate" in err
    run_dir = only_run_dir(tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 128
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (run_dir / "evaluation.json").exists()  # NaN weights are never evaluated


def test_divergence_from_the_command_line_exits_1_without_a_traceback(script, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), *tiny(script),
                             "--learning-rate", "1e30"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training diverged" in result.stderr and result.stderr.count("\n") == 1


def test_a_nan_action_never_reaches_the_env(script, monkeypatch):
    env_id = FAST_ENV[script.__name__]
    envs = script.make_vector_env([script.make_env(env_id) for _ in range(2)])
    obs, _ = envs.reset(seed=0)
    sent = []
    real_step = envs.step
    monkeypatch.setattr(envs, "step", lambda action: sent.append(action) or real_step(action))
    obs_dim, act = script.env_shapes(env_id)
    agent = script.Agent(obs_dim, act)
    with torch.no_grad():
        agent.actor[-1].bias.fill_(math.nan)
    dtype = np.int64 if script.__name__ == "ppo_discrete" else np.float32
    rollout = script.new_rollout(4, 2, obs_dim, envs.single_action_space.shape, dtype)
    if script.__name__ == "ppo_continuous":
        with pytest.raises(script.Diverged, match="non-finite action"):
            script.collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=0)
        assert sent == []
    else:  # a sample of NaN logits is still an integer: the update after the rollout stops training
        script.collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=0)
        batch = script.make_batch(agent=agent, rollout=rollout, rewards=rollout.rewards, gamma=0.99, gae_lambda=0.95)
        args = script.Args(num_envs=2, num_steps=4, num_minibatches=1, update_epochs=1)
        with pytest.raises(script.Diverged, match="non-finite loss"):
            script.update(agent=agent, optimizer=torch.optim.Adam(agent.parameters()), batch=batch, args=args)


def test_the_update_refuses_non_finite_weights(script):
    obs_dim, act = script.env_shapes(FAST_ENV[script.__name__])
    agent = script.Agent(obs_dim, act)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    with torch.no_grad():
        agent.critic[0].weight[0, 0] = math.inf
    n = 8
    actions = torch.zeros(n, dtype=torch.long) if script.__name__ == "ppo_discrete" else torch.zeros(n, act)
    batch = script.Batch(obs=torch.zeros(n, obs_dim), actions=actions, logprobs=torch.zeros(n),
                         advantages=torch.randn(n), value_targets=torch.zeros(n), values=torch.zeros(n))
    args = script.Args(num_envs=1, num_steps=n, num_minibatches=2, update_epochs=1)
    with pytest.raises(script.Diverged):
        script.update(agent=agent, optimizer=optimizer, batch=batch, args=args)


def test_a_nan_evaluation_still_writes_valid_json(script, tmp_path):
    path = tmp_path / "evaluation.json"
    script.report_evaluation(np.array([1.0, math.nan]), str(path), 10)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["mean"] is None and data["returns"] == [1.0, None]


# ------------------------------------------------------------------ checkpoints
def damaged(script, tmp_path):
    """(name, checkpoint dict, message) for checkpoints that load but do not hold what the script saves."""
    good = train_tiny(script, tmp_path / "good") / "checkpoint.pt"

    def edit(change):
        data = torch.load(good, weights_only=True)
        change(data)
        return data

    cases = [
        ("missing tensor", lambda d: d["model"].pop("critic.0.bias"), "do not fit"),
        ("wrong shape", lambda d: d["model"].__setitem__("actor.2.weight", torch.zeros(3, 3)), "do not fit"),
        ("no args", lambda d: d.pop("args"), "lacks, or has damaged, args"),
        ("no model", lambda d: d.pop("model"), "lacks, or has damaged, model"),
        ("args of the wrong type", lambda d: d["args"].__setitem__("num_envs", "two"), "args.num_envs"),
        ("model not tensors", lambda d: d["model"].__setitem__("critic.0.bias", [1, 2]), "model"),
        ("step not a number", lambda d: d.__setitem__("global_step", "x"), "global_step"),
    ]
    return [(name, edit(change), message) for name, change, message in cases]


@pytest.mark.parametrize("flag", ["--eval-checkpoint", "--resume"])
def test_damaged_checkpoints_exit_2_with_one_line(script, tmp_path, capsys, flag):
    for name, data, message in damaged(script, tmp_path):
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(data, path)
        capsys.readouterr()
        assert run_main(script, [flag, str(path)], tmp_path) == 2, name
        assert message in one_error_line(capsys), name


@pytest.mark.parametrize("entry", ["optimizer", "rng"])
def test_resume_needs_the_optimizer_and_rng_state(script, tmp_path, capsys, entry):
    data = torch.load(train_tiny(script, tmp_path) / "checkpoint.pt", weights_only=True)
    data.pop(entry)
    torch.save(data, tmp_path / "partial.pt")
    assert run_main(script, ["--resume", str(tmp_path / "partial.pt")], tmp_path) == 2
    assert entry in one_error_line(capsys)
    capsys.readouterr()
    assert run_main(script, ["--eval-checkpoint", str(tmp_path / "partial.pt"), "--eval-episodes", "1"], tmp_path) == 0


def test_a_damaged_optimizer_state_is_one_line(script, tmp_path, capsys):
    data = torch.load(train_tiny(script, tmp_path) / "checkpoint.pt", weights_only=True)
    data["optimizer"]["param_groups"] = []
    torch.save(data, tmp_path / "bad_optimizer.pt")
    assert run_main(script, ["--resume", str(tmp_path / "bad_optimizer.pt")], tmp_path) == 2
    assert "optimizer or RNG state is damaged" in one_error_line(capsys)


def test_a_checkpoint_cannot_choose_a_module_to_import(script, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = torch.load(train_tiny(script, tmp_path / "run") / "checkpoint.pt", weights_only=True)
    data["args"]["env_id"] = "planted_module:Env-v0"
    torch.save(data, tmp_path / "planted.pt")
    for flag in ("--eval-checkpoint", "--resume"):
        capsys.readouterr()
        assert run_main(script, [flag, str(tmp_path / "planted.pt")], tmp_path) == 2
        assert "not a registered Gymnasium id" in one_error_line(capsys)
    assert not marker.exists()


def test_a_directory_is_not_said_to_be_missing(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path)
    assert run_main(script, ["--eval-checkpoint", str(run_dir)], tmp_path) == 2
    assert "is a directory" in one_error_line(capsys)


def test_hidden_size_message_depends_on_whether_the_flag_was_given(script, tmp_path, capsys):
    data = torch.load(train_tiny(script, tmp_path) / "checkpoint.pt", weights_only=True)
    data["args"]["hidden_size"] = 32  # the weights are 64 wide
    torch.save(data, tmp_path / "inconsistent.pt")
    assert run_main(script, ["--eval-checkpoint", str(tmp_path / "inconsistent.pt")], tmp_path) == 2
    err = one_error_line(capsys)
    assert "damaged" in err and "--hidden-size" not in err


def test_resume_refuses_a_renamed_copy_of_best_pt(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path, "--eval-every", "1", "--periodic-eval-episodes", "1")
    (run_dir / "latest.pt").write_bytes((run_dir / "best.pt").read_bytes())
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert run_main(script, ["--resume", str(run_dir / "latest.pt")], tmp_path) == 2
    assert "is a snapshot" in one_error_line(capsys)
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_batch_size_ends_exactly_or_is_refused(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path)  # 2 envs x 32 steps, to step 128
    ckpt = str(run_dir / "checkpoint.pt")
    assert run_main(script, ["--resume", ckpt, "--num-envs", "3", "--total-timesteps", "300"], tmp_path) == 2
    assert "--total-timesteps 320" in one_error_line(capsys)  # 128 + 2 x 96
    assert run_main(script, ["--resume", ckpt, "--num-envs", "3", "--total-timesteps", "320"], tmp_path) == 0
    after = torch.load(ckpt, weights_only=True)
    assert after["global_step"] == 320 and after["args"]["num_envs"] == 3


def test_resuming_a_finished_run_says_so_and_changes_nothing(script, tmp_path, capsys):
    run_dir = train_tiny(script, tmp_path)
    before = {f: (run_dir / f).read_bytes() for f in ("checkpoint.pt", "evaluation.json")}
    assert run_main(script, ["--resume", str(run_dir / "checkpoint.pt")], tmp_path) == 2
    assert "this run is finished" in one_error_line(capsys)
    assert {f: (run_dir / f).read_bytes() for f in before} == before


def test_eval_checkpoint_writes_no_video_unless_asked(script, tmp_path):
    run_dir = train_tiny(script, tmp_path, "--capture-video", "--eval-episodes", "1")
    before = sorted(os.listdir(run_dir / "videos"))
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--eval-episodes", "1"], tmp_path) == 0
    assert sorted(os.listdir(run_dir / "videos")) == before


# ------------------------------------------------------------------ files and symlinks
def test_writes_replace_a_planted_symlink_instead_of_following_it(script, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("evaluation.json", f"evaluation.json.tmp{os.getpid()}"):  # the old temp-file name too
        os.symlink(outside, run_dir / name)
    script.report_evaluation(np.array([1.0, 2.0]), str(run_dir / "evaluation.json"), 5)
    assert outside.read_text() == "precious"
    assert not os.path.islink(run_dir / "evaluation.json")
    assert json.loads((run_dir / "evaluation.json").read_text())["mean"] == 1.5


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(script, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        script.write_atomically(str(path), fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]
    assert not script.TEMP_FILES


def test_disk_full_during_a_run_is_one_line_and_keeps_the_last_checkpoint(script, tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(data, f):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(28, "No space left on device")
        real_save(data, f)

    monkeypatch.setattr(script.torch, "save", save_until_the_disk_fills)
    assert run_main(script, tiny(script, "--checkpoint-every", "1"), tmp_path) == 1
    err = one_error_line(capsys)
    assert "No space left on device" in err and "(step 64) is intact" in err
    run_dir = only_run_dir(tmp_path)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 64
    assert [f for f in os.listdir(run_dir) if f.endswith(".tmp")] == []


def test_a_second_interrupt_removes_the_temp_file_being_written(script, tmp_path, monkeypatch):
    harness = script.Harness(script.Args(), str(tmp_path), None, None, script.Progress())
    tmp = tmp_path / "checkpoint.pt.abc.tmp"
    tmp.write_bytes(b"partial")
    monkeypatch.setattr(script, "TEMP_FILES", {str(tmp)})
    monkeypatch.setattr(script.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    harness(signal.SIGINT, None)
    with pytest.raises(SystemExit) as exit_info:
        harness(signal.SIGINT, None)
    assert exit_info.value.code == 130 and not tmp.exists()


def test_checkpoints_come_by_time_as_well_as_by_iteration(script, tmp_path, monkeypatch):
    written = []
    real = script.save_checkpoint
    monkeypatch.setattr(script, "save_checkpoint", lambda path, **kw: written.append(kw["progress"].global_step) or real(path, **kw))
    train_tiny(script, tmp_path / "a", "--checkpoint-every", "1000", "--checkpoint-seconds", "1e-9")
    assert written == [64, 128]  # every iteration, though --checkpoint-every is 1000
    written.clear()
    train_tiny(script, tmp_path / "b", "--checkpoint-every", "1000", "--checkpoint-seconds", "0")
    assert written == [128]  # the end only


# ------------------------------------------------------------------ as a user runs it
def start(script, tmp_path, *extra):
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, f"{script.__name__}.py"), *tiny(script),
                             "--total-timesteps", "100000000", "--checkpoint-every", "1000000", "--no-compile", *extra],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_loses_at_most_the_time_between_checkpoints(script, tmp_path):
    proc = start(script, tmp_path, "--checkpoint-seconds", "0.5")
    proc.stdout.readline()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("runs/*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.communicate(timeout=30)
    ckpt = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)  # whole and readable
    assert ckpt["global_step"] > 0 and ckpt["resumable"]


def test_a_closed_stdout_does_not_stop_the_run(script, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), *tiny(script),
                             "--total-timesteps", "1280"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"Exception ignored" not in err, err
    run_dir = only_run_dir(tmp_path)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 1280
    assert (run_dir / "evaluation.json").exists()


def test_sighup_saves_like_sigterm(script, tmp_path):
    proc = start(script, tmp_path)
    assert proc.stdout.readline().startswith(script.__name__)
    assert proc.stdout.readline().startswith("step")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP and "Traceback" not in err
    ckpt = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] > 0 and ckpt["global_step"] % 64 == 0


def test_ctrl_c_during_the_imports_prints_no_traceback(script, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), "--help"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # python is up; torch and gymnasium take longer than this to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err

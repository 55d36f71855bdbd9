"""Watch a policy (--render), stop when solved (--target-return), take it elsewhere (--export)."""
import json
import os
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import FAST_ENV, ROOT, TINY, only_run_dir, ppo_discrete, run_main

# An env whose untrained episodes end within a second or two at the env's own frame rate.
SHORT_ENV = {"ppo_discrete": "CartPole-v1", "ppo_continuous": "LunarLanderContinuous-v3"}


NEEDS_CXX = pytest.mark.skipif(not ppo_discrete.cpp_compiler_found(), reason="compiling needs a C++ compiler")


def trained(script, tmp_path, env_id=None, *extra):
    argv = ["--env-id", env_id or SHORT_ENV[script.__name__], *TINY, *extra]
    assert run_main(script, argv, tmp_path / "train") == 0
    return only_run_dir(tmp_path / "train")


def test_render_plays_episodes_in_a_window(script, tmp_path, capsys, monkeypatch):
    run_dir = trained(script, tmp_path)
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a real pygame window, drawn nowhere
    capsys.readouterr()
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--render", "--eval-episodes", "2"],
                    tmp_path) == 0
    assert re.findall(r"^episode (\d): return -?\d+\.\d$", capsys.readouterr().out, re.M) == ["1", "2"]


def test_render_without_a_display_says_what_to_do(script, tmp_path, capsys, monkeypatch):
    run_dir = trained(script, tmp_path)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--render"], tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--capture-video" in err


@pytest.mark.parametrize("flags,message", [
    (["--render"], "add --eval-checkpoint"), (["--export", "x.onnx"], "add --eval-checkpoint"),
    (["--target-return", "nan"], "--target-return must be a finite number")])
def test_bad_uses_of_the_new_flags(script, tmp_path, capsys, flags, message):
    assert run_main(script, [*TINY, "--env-id", FAST_ENV[script.__name__], *flags], tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "runs")


def test_export_into_a_missing_folder_is_refused(script, tmp_path, capsys):
    run_dir = trained(script, tmp_path)
    capsys.readouterr()
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--export",
                             str(tmp_path / "no" / "p.onnx")], tmp_path) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_target_return_stops_training_and_reports_when(script, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 20 iterations of 64 steps are planned; every evaluation reaches -1e9, the first (iteration 2) at step 128
    run_dir = trained(script, tmp_path, FAST_ENV[script.__name__], "--total-timesteps", "1280",
                      "--target-return", "-1e9", "--eval-every", "2", "--periodic-eval-episodes", "1")
    assert re.search(r"--target-return -1000000000.0 reached at step 128, after \d+ s", capsys.readouterr().out)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 128
    # The schedule is the 20-iteration one, not shortened: iteration 2 ran at lr x (1 - 64 / 1280).
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4 * 0.95)
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["target_reached_step"] == 128 and result["target_reached_seconds"] > 0
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("eval/target_reached_seconds")] == [128]


def test_target_return_turns_on_periodic_evaluation(script, tmp_path):
    # 40 iterations planned: without --eval-every, one evaluation per iteration (40 // 40)
    run_dir = trained(script, tmp_path, FAST_ENV[script.__name__], "--total-timesteps", str(40 * 64),
                      "--target-return", "1e9", "--periodic-eval-episodes", "1")
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["global_step"] == 40 * 64 and result["target_reached_step"] is None
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["eval_every"] == 1


def test_export_round_trip(script, tmp_path):
    import onnxruntime

    env_id = FAST_ENV[script.__name__]
    run_dir = trained(script, tmp_path, env_id)
    path = tmp_path / "policy.onnx"
    assert run_main(script, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--export", str(path)], tmp_path) == 0
    agent = script.agent_from_checkpoint(script.load_checkpoint(str(run_dir / "checkpoint.pt")))
    space = gym.make(env_id).action_space
    obs = np.random.default_rng(1).normal(0, 3, size=(2000, agent.actor[0].in_features)).astype(np.float32)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"obs": obs})[0]
    with torch.no_grad():
        want = agent.deterministic_action(torch.from_numpy(obs)).numpy()
    if isinstance(space, gym.spaces.Box):  # the env's bounds are inside the exported policy
        assert np.abs(got).max() <= space.high.max()
        np.testing.assert_allclose(got, np.clip(want, space.low, space.high), rtol=1e-4, atol=1e-4)
    else:
        assert got.dtype == np.int64 and (got == want).mean() > 0.999


def test_the_readme_onnx_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from conftest import ppo_discrete

    readme = open(os.path.join(ROOT, "README.md")).read()
    example = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    run_dir = trained(ppo_discrete, tmp_path, "LunarLander-v3")
    monkeypatch.chdir(tmp_path)
    assert run_main(ppo_discrete, ["--eval-checkpoint", str(run_dir / "checkpoint.pt"), "--export", "policy.onnx"],
                    tmp_path) == 0
    capsys.readouterr()
    exec(compile(example, "README.md", "exec"), {})
    assert re.fullmatch(r"return -?\d+\.\d\n", capsys.readouterr().out)


@NEEDS_CXX
def test_compile_gives_the_eager_weights_and_adam_state_up_to_float_rounding(script, tmp_path):
    saved = []
    for flags in (["--no-compile"], ["--compile"]):
        run_dir = trained(script, tmp_path / flags[0], FAST_ENV[script.__name__], *flags)
        saved.append(torch.load(run_dir / "checkpoint.pt", weights_only=True))
    eager, compiled = saved
    assert (eager["args"]["compile"], compiled["args"]["compile"]) == (False, True)
    for key in eager["model"]:
        torch.testing.assert_close(compiled["model"][key], eager["model"][key], rtol=1e-5, atol=1e-6)
    # Adam's moments and step counts, parameter by parameter: a checkpoint of either path resumes in the other
    assert compiled["optimizer"]["state"].keys() == eager["optimizer"]["state"].keys()
    for index, state in eager["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(compiled["optimizer"]["state"][index][name], value, rtol=1e-4, atol=1e-7)


def test_a_failing_compile_trains_eagerly_with_one_note(tmp_path):
    # A compiler that is there but does not work: torch.compile fails at the first compiled step.
    from conftest import ppo_discrete, tiny

    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), *tiny(ppo_discrete), "--compile"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("note: the compiled gradient step was not used: compiling it failed (InductorError: ")
    assert result.stderr.count("\n") == 1 and "evaluation:" in result.stdout


@NEEDS_CXX
def test_compile_is_on_for_long_runs_only_unless_the_flag_is_given(script):
    def compiles(*argv):
        import tyro

        args = tyro.cli(script.RunArgs, args=["--env-id", FAST_ENV[script.__name__], *argv])
        agent, optimizer = script.make_agent_and_optimizer(args)
        forced = "compile" in script.explicit_flags(list(argv))
        return script.choose_gradient_step(args, agent, optimizer, forced=forced) is not script.gradient_step

    long_run = ["--total-timesteps", str(2 * script.COMPILE_MIN_STEPS * 64)]  # minibatches of 64 by default
    assert compiles(*long_run) and not compiles(*long_run, "--no-compile")
    assert not compiles(*TINY) and compiles(*TINY, "--compile")


def test_compile_without_a_cpp_compiler_trains_eagerly_with_one_note(script, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    run_dir = trained(script, tmp_path, FAST_ENV[script.__name__], "--compile")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the gradient step needs a C++ compiler" in err
    assert "compiling the gradient step (torch.compile)" not in capsys.readouterr().out
    assert run_dir.exists()

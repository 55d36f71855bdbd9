"""tools/: watch, export_onnx and gif on checkpoints of tiny runs; none of them trains."""
import math
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import FAST_ENV, ROOT

from tools import export_onnx, gif, watch

TOOLS = {"watch": watch, "export_onnx": export_onnx, "gif": gif}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Script name -> checkpoint.pt of a tiny run of it (each script trains once)."""
    paths = {}
    for name in ("ppo_discrete", "ppo_continuous"):
        runs = tmp_path_factory.mktemp(name) / "runs"
        script = sys.modules[name]
        assert script.main(["--env-id", FAST_ENV[name], "--num-envs", "2", "--num-steps", "32", "--num-minibatches",
                            "2", "--update-epochs", "1", "--total-timesteps", "64", "--eval-episodes", "1",
                            "--runs-dir", str(runs)]) == 0
        (run,) = os.listdir(runs)
        paths[name] = str(runs / run / "checkpoint.pt")
    return paths


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def agent_of(name: str, path: str):
    script = sys.modules[name]
    data = script.load_checkpoint(path)
    args = script.Args(**{f.name: data["args"][f.name] for f in fields(script.Args)})
    agent, _ = script.make_agent_and_optimizer(args)
    agent.load_state_dict(data["model"])
    return agent


def test_export_discrete_gives_the_agents_argmax(checkpoint, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "policy.onnx"
    assert export_onnx.main(["ppo_discrete", checkpoint["ppo_discrete"], str(out)]) == 0
    assert "4096 random observations" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs"] and [o.name for o in session.get_outputs()] == ["action"]
    obs = np.random.default_rng(0).normal(0, 2, (500, 4)).astype(np.float32)  # another batch size than the export's
    got = session.run(None, {"obs": obs})[0]
    with torch.no_grad():
        logits = agent_of("ppo_discrete", checkpoint["ppo_discrete"]).actor(torch.from_numpy(obs)).numpy()
    top2 = -np.sort(-logits, axis=-1)[:, :2]
    assert got.shape == (500,) and ((got == logits.argmax(-1)) | (top2[:, 0] - top2[:, 1] < 1e-5)).all()


def test_export_continuous_clips_to_the_bounds_inside_the_graph(checkpoint, tmp_path, capsys):
    import onnxruntime

    # Widen the last actor layer so that many means fall outside Pendulum's [-2, 2].
    data = torch.load(checkpoint["ppo_continuous"], weights_only=True)
    last = max((k for k in data["model"] if k.startswith("actor.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    data["model"][last] *= 1000
    torch.save(data, wide := tmp_path / "wide.pt")
    out = tmp_path / "policy.onnx"
    assert export_onnx.main(["ppo_continuous", str(wide), str(out)]) == 0
    obs = np.random.default_rng(0).uniform(-8, 8, (500, 3)).astype(np.float32)
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"obs": obs})[0]
    with torch.no_grad():  # the raw obs: the agent normalizes them itself, and the graph with it
        mean = agent_of("ppo_continuous", str(wide)).deterministic_action(torch.from_numpy(obs)).numpy()
    assert (np.abs(mean) > 2).mean() > 0.2 and (np.abs(mean) < 2).mean() > 0.05  # both cases exercised
    assert got.shape == (500, 1) and np.allclose(got, np.clip(mean, -2, 2), atol=1e-4)


@pytest.mark.parametrize("target", ["folder", "checkpoint", "missing folder"])
def test_export_refuses_a_bad_target(checkpoint, tmp_path, capsys, target):
    ckpt = checkpoint["ppo_discrete"]
    before = open(ckpt, "rb").read()
    out = {"folder": str(tmp_path), "checkpoint": ckpt, "missing folder": str(tmp_path / "no" / "p.onnx")}[target]
    assert export_onnx.main(["ppo_discrete", ckpt, out]) == 2
    one_line(capsys.readouterr().err)
    assert open(ckpt, "rb").read() == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_refuses_the_other_scripts_checkpoint(checkpoint, tmp_path, capsys, monkeypatch, tool):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # so that watch gets as far as the checkpoint
    extra = {"watch": [], "export_onnx": [str(tmp_path / "p.onnx")], "gif": [str(tmp_path / "a.gif")]}[tool]
    assert TOOLS[tool].main(["ppo_discrete", checkpoint["ppo_continuous"], *extra]) == 2
    assert "not a checkpoint of ppo_discrete.py but of ppo_continuous.py" in one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_watch_without_a_display_says_to_record_videos(checkpoint, capsys, monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert watch.main(["ppo_discrete", checkpoint["ppo_discrete"]]) == 2
    assert "--eval-checkpoint" in (line := one_line(capsys.readouterr().err)) and "--capture-video" in line


def test_watch_plays_an_episode_and_prints_its_return(checkpoint, capsys, monkeypatch):
    import pygame

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a window nobody sees
    monkeypatch.setattr(pygame.time, "Clock", lambda: type("NoWait", (), {"tick": lambda self, fps: 0})())
    assert watch.main(["ppo_discrete", checkpoint["ppo_discrete"], "--episodes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("episode 1: return ")
    assert float(lines[0].split()[-1]) >= 1  # CartPole pays 1 a step


def test_gif_keeps_every_kth_frame_at_the_envs_frame_rate(checkpoint, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "a.gif"
    assert gif.main(["ppo_continuous", checkpoint["ppo_continuous"], str(out), "--every", "10", "--scale", "0.2"]) == 0
    steps = int(capsys.readouterr().out.split()[-2])
    kept, frame_ms = math.ceil(steps / 10), 330  # Pendulum renders at 30 fps: 3 fps, in hundredths of a second
    with Image.open(out) as image:
        assert image.info["loop"] == 0 and image.size == (100, 100)  # 500 x 500 scaled by 0.2
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
    # Pillow merges a frame identical to the one before into it, so the time adds up, not the count:
    # each kept frame for one frame time, the last for ten.
    assert sum(durations) == (kept + 9) * frame_ms and 1 < len(durations) <= kept
    assert os.listdir(tmp_path) == ["a.gif"]


def test_a_tools_error_is_one_line_on_the_command_line(checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "watch.py"), "ppo_discrete",
                           checkpoint["ppo_discrete"]], capture_output=True, text=True, env=env, timeout=120)
    if not sys.platform.startswith("linux"):
        pytest.skip("only Linux tells a missing display by its environment")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no display is set" in one_line(proc.stderr)


@pytest.mark.parametrize("tool", TOOLS)
def test_no_tool_imports_a_module_a_checkpoint_names(checkpoint, tmp_path, capsys, monkeypatch, tool):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Env: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = torch.load(checkpoint["ppo_discrete"], weights_only=True)
    data["args"]["env_id"] = "planted_module:Env-v0"  # gym.make would import planted_module for it
    torch.save(data, planted := tmp_path / "planted.pt")
    extra = {"watch": [], "export_onnx": [str(tmp_path / "p.onnx")], "gif": [str(tmp_path / "a.gif")]}[tool]
    assert TOOLS[tool].main(["ppo_discrete", str(planted), *extra]) == 2
    assert "not a registered Gymnasium id" in one_line(capsys.readouterr().err)
    assert "planted_module" not in sys.modules and sorted(os.listdir(tmp_path)) == ["planted.pt", "planted_module.py"]

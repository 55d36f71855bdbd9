"""Faults made for real, not patched in: a full file system (a small tmpfs, as root), a read-only
one, a dead X display, kill -9, signals and a second process at awkward moments, checkpoints
crafted to break the reader. Each ends in one line and a known exit code, with nothing lost.

Where the fault needs a process of its own (a signal, a thread's error, a lock held by another
process, an import-time error) the script runs as a subprocess; elsewhere main() runs in this
process, with the same flags a user types. The harness code is the same text in both scripts
(tests/test_twins.py), so the cases that do not depend on the action space run on ppo_discrete
only."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from conftest import FAST_ENV, ROOT, ppo_discrete

# A run of a second or so: two iterations of 128 steps.
FLAGS = ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
         "--update-epochs", "1", "--no-compile", "--eval-episodes", "2", "--print-every", "0"]
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def flags(script=ppo_discrete, *extra):
    return ["--env-id", FAST_ENV[script.__name__], *FLAGS, *extra]


def env_without_noise(tmp_path):
    """The environment for a subprocess, with an XDG_RUNTIME_DIR so that SDL prints no line of its own."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}


def cli(script, argv, tmp_path, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{script.__name__}.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env_without_noise(tmp_path), **kwargs)


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def run_dirs(runs):
    return sorted(p for p in runs.iterdir() if p.is_dir())


TRAINED = {}


@pytest.fixture
def trained(tmp_path_factory):
    """A copy, under a fresh folder, of a finished tiny run of the script (trained once per script)."""
    def copy(script=ppo_discrete):
        if script.__name__ not in TRAINED:
            base = tmp_path_factory.mktemp(f"trained_{script.__name__}")
            assert script.main([*flags(script), "--runs-dir", str(base / "runs")]) == 0
            TRAINED[script.__name__] = run_dirs(base / "runs")[0]
        source = TRAINED[script.__name__]
        target = tmp_path_factory.mktemp("copy") / "runs" / source.name
        shutil.copytree(source, target)
        return target
    return copy


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (a checkpoint of the tiny run takes 139 KB: two at once do not fit)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave: int = 0) -> None:
    """Fill the file system of disk, leaving `leave` bytes free."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - leave))


# ------------------------------------------------------------------ class 1: writes that fail for real
@NEEDS_ROOT
def test_a_full_disk_during_a_checkpoint_write_is_one_line(small_disk, capsys):
    assert ppo_discrete.main([*flags(ppo_discrete, "--checkpoint-every", "1"), "--runs-dir", str(small_disk / "runs")]) == 1
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and "(step 128) is intact" in err
    run_dir, = run_dirs(small_disk / "runs")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 128
    assert not list(run_dir.glob("*.tmp"))


@NEEDS_ROOT
def test_a_full_disk_under_the_tensorboard_writer_is_one_line(tmp_path, small_disk):
    (small_disk / "runs").mkdir()
    fill(small_disk)
    result = cli(ppo_discrete, [*flags(), "--runs-dir", str(small_disk / "runs")], tmp_path)
    assert result.returncode == 1
    assert "No space left on device" in one_line(result.stderr)


@NEEDS_ROOT
def test_a_full_disk_under_the_video_writer_is_one_line(tmp_path, small_disk):
    (small_disk / "runs").mkdir()
    fill(small_disk, leave=4096)  # one page: TensorBoard's first events fit, a video does not
    result = cli(ppo_discrete, [*flags(ppo_discrete, "--capture-video", "--checkpoint-every", "1000",
                                       "--checkpoint-seconds", "0"), "--runs-dir", str(small_disk / "runs")], tmp_path)
    assert result.returncode == 1
    assert "No space left on device" in one_line(result.stderr)


# ------------------------------------------------------------------ class 2: --export
def export(ckpt, target, tmp_path, capsys):
    capsys.readouterr()
    code = ppo_discrete.main(["--eval-checkpoint", str(ckpt), "--export", str(target)])
    return code, capsys.readouterr().err


def test_export_onto_the_runs_own_checkpoint_is_refused(trained, tmp_path, capsys):
    ckpt = trained() / "checkpoint.pt"
    before = ckpt.read_bytes()
    code, err = export(ckpt, ckpt, tmp_path, capsys)
    assert code == 2 and "is a checkpoint" in one_line(err)
    assert ckpt.read_bytes() == before


def test_export_to_a_folder_is_refused(trained, tmp_path, capsys):
    code, err = export(trained() / "checkpoint.pt", tmp_path, tmp_path, capsys)
    assert code == 2 and "is a folder" in one_line(err)


def test_export_into_a_read_only_folder_is_refused(trained, tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system then
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)]).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        folder.chmod(0o555)
    try:
        code, err = export(trained() / "checkpoint.pt", folder / "policy.onnx", tmp_path, capsys)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)
    assert code == 2 and "not writable" in one_line(err)


@NEEDS_ROOT
def test_export_to_a_full_disk_is_one_line(trained, tmp_path, small_disk, capsys):
    fill(small_disk)
    code, err = export(trained() / "checkpoint.pt", small_disk / "policy.onnx", tmp_path, capsys)
    assert code == 1 and "No space left on device" in one_line(err)
    assert sorted(os.listdir(small_disk)) == ["filler"]


# ------------------------------------------------------------------ class 3: kill -9 and signals
def test_the_temp_file_a_kill_9_leaves_is_removed_by_the_next_resume(trained, capsys):
    run_dir = trained()
    (run_dir / "checkpoint.pt.k9x_2ab7.tmp").write_bytes(b"half a checkpoint")  # what kill -9 mid-write leaves
    assert ppo_discrete.main(["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "384"]) == 0
    assert not list(run_dir.glob("*.tmp"))


def test_sighup_during_the_final_evaluation_loses_nothing(tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), *flags(), "--eval-episodes", "5000",
                             "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_without_noise(tmp_path))
    for line in proc.stdout:
        if line.startswith("final evaluation"):  # it starts now
            break
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP and "Traceback" not in err, err
    assert "--resume" in err
    run_dir, = run_dirs(tmp_path / "runs")
    assert not (run_dir / "evaluation.json").exists()
    # The run is trained, its evaluation is not: resuming runs the evaluation instead of calling it finished.
    assert ppo_discrete.main(["--resume", str(run_dir / "checkpoint.pt"), "--eval-episodes", "2"]) == 0
    assert '"global_step": 256' in (run_dir / "evaluation.json").read_text()


# ------------------------------------------------------------------ class 4: runs that collide
def test_a_run_started_in_the_same_second_with_the_same_flags_gets_a_folder_of_its_own(tmp_path, capsys):
    runs = tmp_path / "runs"
    now = time.time()
    for t in range(-1, 60):  # another run of these flags has this name in each of the next 60 s
        (runs / f"CartPole-v1__ppo_discrete__1__{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + t))}").mkdir(
            parents=True, exist_ok=True)
    assert ppo_discrete.main([*flags(), "--runs-dir", str(runs)]) == 0, capsys.readouterr().err
    new = [p for p in run_dirs(runs) if os.listdir(p)]
    assert len(new) == 1 and new[0].name.endswith("-2") and (new[0] / "evaluation.json").exists()


def test_two_resumes_of_one_run_at_once_are_one_too_many(trained, tmp_path, capsys):
    run_dir = trained()
    ckpt = str(run_dir / "checkpoint.pt")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), "--resume", ckpt,
                              "--total-timesteps", "100000000"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env_without_noise(tmp_path))
    try:
        assert first.stdout.readline().startswith("resuming")
        capsys.readouterr()
        assert ppo_discrete.main(["--resume", ckpt, "--total-timesteps", "512"]) == 2  # this process is the second
        assert "another process" in one_line(capsys.readouterr().err)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM
    assert torch.load(ckpt, weights_only=True)["global_step"] >= 256  # the first one's, whole


# ------------------------------------------------------------------ class 5: crafted or damaged checkpoints
def crafted(script, ckpt, tmp_path, name):
    data = torch.load(ckpt, weights_only=True)
    first = next(iter(data["model"]))
    if name == "scalar weight":
        data["model"]["actor.0.weight"] = torch.tensor(1.0)
    elif name == "non-string key":
        data["model"][7] = data["model"].pop(first)
    elif name == "NaN weights":
        data["model"]["actor.0.weight"].fill_(float("nan"))
    path = tmp_path / f"{name.replace(' ', '_')}.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("name", ["scalar weight", "non-string key", "NaN weights"])
def test_a_crafted_checkpoint_is_one_line(script, trained, tmp_path, capsys, name):
    run_dir = trained(script)
    path = crafted(script, run_dir / "checkpoint.pt", tmp_path, name)
    for mode in (["--eval-checkpoint", str(path), "--eval-episodes", "1"], ["--resume", str(path), "--total-timesteps",
                                                                            "512"]):
        capsys.readouterr()
        assert script.main(mode) == 2, (name, mode[0])
        assert "damaged" in one_line(capsys.readouterr().err)


def test_a_checkpoint_that_inflates_is_refused_before_it_is_loaded(script, trained, tmp_path, capsys, monkeypatch):
    source = trained(script) / "checkpoint.pt"
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
        new.writestr(info.filename.split("/")[0] + "/padding", b"\0" * 20_000_000)  # 20 MB in about 20 KB
    assert bomb.stat().st_size < source.stat().st_size + 100_000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    assert script.main(["--eval-checkpoint", str(bomb)]) == 2
    assert "larger than it stores" in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------ class 6: a checkpoint chooses no code
def test_animate_imports_nothing_a_checkpoint_names(trained, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import animate

    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Env: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for entry in ("script", "env id"):
        data = torch.load(trained() / "checkpoint.pt", weights_only=True)
        if entry == "script":
            data["script"] = "planted_module"
        else:
            data["args"]["env_id"] = "planted_module:Env-v0"
        torch.save(data, tmp_path / "planted.pt")
        monkeypatch.setattr(sys, "argv", ["animate.py", str(tmp_path / "planted.pt"), str(tmp_path / "out.gif")])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            animate.main()
        assert exit_info.value.code == 2, entry
        one_line(capsys.readouterr().err)
        sys.modules.pop("planted_module", None)
    assert not marker.exists() and not (tmp_path / "out.gif").exists()


# ------------------------------------------------------------------ class 7: environment and resources
def test_render_on_a_dead_display_is_refused(trained, capsys, monkeypatch):
    number = next(n for n in range(50, 100) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    monkeypatch.setenv("DISPLAY", f":{number}")  # no X server there
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    capsys.readouterr()
    assert ppo_discrete.main(["--eval-checkpoint", str(trained() / "checkpoint.pt"), "--render", "--eval-episodes", "1"]) == 2
    assert f"DISPLAY=:{number}" in one_line(capsys.readouterr().err)


def test_an_unusable_compile_cache_is_one_line_even_with_no_compile(tmp_path):
    (tmp_path / "not_a_folder").write_text("")
    env = {**env_without_noise(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "not_a_folder")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), *flags(), "--runs-dir",
                             str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "TORCHINDUCTOR_CACHE_DIR" in one_line(result.stderr)
    assert not (tmp_path / "runs").exists()


def test_the_memory_estimate_counts_each_env(script, monkeypatch):
    monkeypatch.setattr(script, "available_memory", lambda: 2**30)
    obs_dim, action_size = script.env_shapes(FAST_ENV[script.__name__])
    args = script.Args(num_envs=20_000, num_steps=1, num_minibatches=1, total_timesteps=20_000)
    error = script.check_memory(args, obs_dim, action_size)  # 20,000 envs of Lunar Lander took 2.45 GB
    assert error is not None and "20,000 envs" in error


def test_a_run_that_reached_its_target_return_is_finished(tmp_path, capsys):
    argv = [*flags(ppo_discrete, "--target-return", "-1e9", "--eval-every", "1", "--periodic-eval-episodes", "1"),
            "--runs-dir", str(tmp_path / "runs")]
    assert ppo_discrete.main(argv) == 0
    run_dir, = run_dirs(tmp_path / "runs")
    before = {f: (run_dir / f).read_bytes() for f in ("checkpoint.pt", "evaluation.json")}
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 128
    capsys.readouterr()
    assert ppo_discrete.main(["--resume", str(run_dir / "checkpoint.pt")]) == 2
    assert "--target-return" in one_line(capsys.readouterr().err)
    assert {f: (run_dir / f).read_bytes() for f in before} == before


def test_an_over_long_exp_name_creates_no_folder(tmp_path, capsys):
    runs = tmp_path / "deep" / "runs"
    assert ppo_discrete.main([*flags(), "--exp-name", "x" * 250, "--runs-dir", str(runs)]) == 2
    assert "--exp-name" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "deep").exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert ppo_discrete.main([*flags(), "--runs-dir", str(tmp_path / "runs")]) == 0
    finally:
        os.umask(old)
    run_dir, = run_dirs(tmp_path / "runs")
    modes = {f: (run_dir / f).stat().st_mode & 0o777 for f in ("checkpoint.pt", "evaluation.json")}
    assert modes == {"checkpoint.pt": 0o640, "evaluation.json": 0o640}


def test_a_resumed_copy_of_a_run_prints_its_own_tensorboard_path(trained, capsys):
    run_dir = trained()  # a copy, in another folder than the runs dir it was trained in
    capsys.readouterr()
    assert ppo_discrete.main(["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "384"]) == 0
    logdir = re.search(r"tensorboard --logdir (\S+)", capsys.readouterr().out).group(1)
    assert os.path.abspath(logdir) == str(run_dir.parent)

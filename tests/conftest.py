"""The scripts are single files at the repo root, imported here as modules."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ppo_continuous  # noqa: E402
import ppo_discrete  # noqa: E402

SCRIPTS = [ppo_discrete, ppo_continuous]
# A small, fast env of each action space kind, for the smoke runs.
FAST_ENV = {"ppo_discrete": "CartPole-v1", "ppo_continuous": "Pendulum-v1"}
OTHER_KIND_ENV = {"ppo_discrete": "Pendulum-v1", "ppo_continuous": "CartPole-v1"}
# Flags for a training run of a second or so.
TINY = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "2",
        "--total-timesteps", "128", "--eval-episodes", "2"]


@pytest.fixture(params=SCRIPTS, ids=lambda m: m.__name__)
def script(request):
    return request.param


def run_main(script, argv, tmp_path):
    """main() in process, with every run directory under tmp_path."""
    return script.main([*argv, "--runs-dir", str(tmp_path / "runs")])


def only_run_dir(tmp_path):
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1, runs
    return tmp_path / "runs" / runs[0]


def tiny(script, *extra):
    """The tiny flags on the script's fast env, plus extra."""
    return ["--env-id", FAST_ENV[script.__name__], *TINY, *extra]


def train_tiny(script, tmp_path, *extra):
    """A tiny run under tmp_path/runs; its run directory."""
    assert run_main(script, tiny(script, *extra), tmp_path) == 0
    return only_run_dir(tmp_path)

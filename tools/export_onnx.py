"""Export a trained policy to ONNX, for inference without PyTorch or this code.

    python tools/export_onnx.py ppo_discrete runs/RUN/checkpoint.pt policy.onnx

The graph is the deterministic policy: input "obs" (B, obs_dim) float32, output "action" ((B,)
int64 for ppo_discrete, (B, action_dim) float32 for ppo_continuous, clipped to the env's bounds).
ppo_continuous's observation normalization is part of its agent, so it is in the graph too. The
file is checked with onnxruntime against the agent on a few thousand random observations.
Needs `pip install -r benchmark/requirements.txt` (onnx, onnxscript, onnxruntime).
"""

import argparse
import importlib
import logging
import os
import pathlib
import sys
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.loading import load_agent, write_whole  # noqa: E402
N_CHECKS = 4096


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=["ppo_discrete", "ppo_continuous"], help="the script that trained it")
    parser.add_argument("checkpoint", help="a run's checkpoint.pt or best.pt")
    parser.add_argument("out", help="the .onnx file to write")
    opts = parser.parse_args(argv)
    script = importlib.import_module(opts.script)
    try:
        return export(script, opts.checkpoint, opts.out)
    except script.RunError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return e.args[1] if len(e.args) > 1 else 2


class Policy(torch.nn.Module):
    """The deterministic policy as one function of the observation; Box actions clipped to the bounds."""

    def __init__(self, agent: torch.nn.Module, bounds):
        super().__init__()
        self.agent, self.bounds = agent, bounds

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        action = self.agent.deterministic_action(obs)
        return action if self.bounds is None else torch.clamp(action, *self.bounds)


def export(script, checkpoint: str, out: str) -> int:
    if os.path.isdir(out):
        raise script.RunError(f"{out} is a folder: give the path of the .onnx file to write")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise script.RunError(f"{out}: its folder does not exist")
    if os.path.isfile(out) and zipfile.is_zipfile(out):  # torch checkpoints are zips, ONNX files are not
        raise script.RunError(f"{out} is a checkpoint: exporting over it would destroy it; give another path")
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch.onnx.export(dynamo=True) needs it, and onnx)
    except ImportError as e:
        raise script.RunError(f"ONNX export needs {e.name}: pip install -r benchmark/requirements.txt") from None
    args, agent = load_agent(script, checkpoint)
    env = gym.make(args.env_id)
    space, obs_space = env.action_space, env.observation_space
    env.close()
    bounds = (torch.as_tensor(space.low), torch.as_tensor(space.high)) if isinstance(space, gym.spaces.Box) else None
    policy = Policy(agent, bounds)

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # no notes about optional torchvision ops
    with warnings.catch_warnings():  # the exporter's own deprecation notes are not the user's concern
        warnings.simplefilter("ignore")
        program = torch.onnx.export(policy, (torch.zeros(2, obs_space.shape[0]),), dynamo=True, verbose=False,
                                    input_names=["obs"], output_names=["action"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    model = program.model_proto.SerializeToString()

    # Checked before it is written: a file that disagrees with the agent never lands under the name.
    obs_space.seed(0)
    obs = np.stack([obs_space.sample() for _ in range(N_CHECKS)]).astype(np.float32)
    got = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"obs": obs})[0]
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
        if bounds:
            same = np.isclose(got, expected, rtol=1e-4, atol=1e-4).all(-1)
        else:  # an argmax may flip only where the top two logits tie to float precision
            top2 = agent.actor(torch.from_numpy(obs)).topk(2, dim=-1).values.numpy()
            same = (got == expected) | (top2[:, 0] - top2[:, 1] < 1e-5)
    if not same.all():
        raise script.RunError(f"the exported graph disagrees with the agent on {int((~same).sum())} of {N_CHECKS} "
                              "random observations: nothing was written", 1)
    write_whole(script, out, lambda path: pathlib.Path(path).write_bytes(model), ": nothing was exported")
    print(f"exported {out}: obs ({obs_space.shape[0]},) float32 in, action out; the agent's actions on "
          f"{N_CHECKS} random observations (onnxruntime)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the tools share: a checkpoint's agent, read through the script that wrote it (its own
load_checkpoint, Args and make_agent_and_optimizer), on the CPU; and a file written whole or not at all.
Trains nothing."""

import contextlib
import os
from dataclasses import fields, replace

import gymnasium as gym


def load_agent(script, checkpoint: str):
    """(the run's Args, its agent with the checkpoint's weights), or RunError with one line."""
    data = script.load_checkpoint(checkpoint)
    try:
        args = replace(script.Args(**{f.name: data["args"][f.name] for f in fields(script.Args)}), cuda=False)
    except KeyError as e:  # a checkpoint of an older version of the script
        raise script.RunError(f"{checkpoint} lacks the flag {e.args[0]!r}: another version of "
                              f"{script.__name__}.py wrote it") from None
    if args.env_id not in gym.registry:  # gym.make("module:Env") would import that module
        raise script.RunError(f"{checkpoint} names env {args.env_id!r}, which is not a registered Gymnasium id")
    if error := script.check_env(args.env_id):
        raise script.RunError(error)
    agent, _ = script.make_agent_and_optimizer(args)
    try:
        agent.load_state_dict(data["model"])
    except (KeyError, RuntimeError):
        raise script.RunError(f"{checkpoint}'s weights do not fit the agent for {args.env_id}") from None
    return args, agent.eval()


def write_whole(script, out: str, write, after: str = "") -> None:
    """write(path) into out + ".tmp", then renamed over out: a failed write leaves no part of a file under
    that name (and the old file, if any). An OSError is RunError's one line, then `after`."""
    try:
        write(out + ".tmp")
        os.replace(out + ".tmp", out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(out + ".tmp")
        raise script.RunError(f"cannot write {out} ({e.strerror or e}){after}", 1) from None

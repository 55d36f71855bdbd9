"""One text per step: gradient_step is what a reader edits, and the compiled path (torch.compile of
that same function, which long runs take by default) follows every edit of it and of the optimizer.
A tiny run stands in for a long one by forcing Args.compiles."""
import os
import shutil

import pytest
import torch

from conftest import ppo_discrete
from helpers import train_for_test


def edited_step(script):
    """gradient_step as a reader might edit it: the value targets scaled by 1.01 (small, as real edits are)."""
    real = script.gradient_step

    def gradient_step(*, agent, optimizer, mb, args):
        return real(agent=agent, optimizer=optimizer, mb=mb._replace(value_targets=mb.value_targets * 1.01), args=args)

    return gradient_step


def with_adamw(script):
    real = script.make_agent_and_optimizer

    def make_agent_and_optimizer(args):
        agent, adam = real(args)
        return agent, torch.optim.AdamW(agent.parameters(), lr=adam.param_groups[0]["lr"], weight_decay=0.1, fused=True)

    return make_agent_and_optimizer


def weights(script, monkeypatch, tmp_path, *, edit: bool, compiled: bool):
    with monkeypatch.context() as mp:
        if edit:
            mp.setattr(script, "gradient_step", edited_step(script))
            mp.setattr(script, "make_agent_and_optimizer", with_adamw(script))
        compiles = []
        if compiled:
            mp.setattr(script.Args, "compiles", property(lambda self: True))
            real_compile = torch.compile
            mp.setattr(torch, "compile", lambda fn, **kw: compiles.append(fn) or real_compile(fn, **kw))
        args = script.Args(env_id="CartPole-v1", num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2,
                           total_timesteps=192, compile=compiled)
        agent = train_for_test(script, args, tmp_path)
        assert compiles == ([script.gradient_step] if compiled else [])  # what train() compiled: the text as edited
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_follows_an_edit_of_the_step_and_of_the_optimizer(monkeypatch, tmp_path):
    script = ppo_discrete
    plain = weights(script, monkeypatch, tmp_path, edit=False, compiled=False)
    edited = weights(script, monkeypatch, tmp_path, edit=True, compiled=False)
    edited_compiled = weights(script, monkeypatch, tmp_path, edit=True, compiled=True)
    effect, rounding = (edited - plain).norm(), (edited_compiled - edited).norm()
    assert effect > 1e-3 * plain.norm()  # the edit moves the weights...
    assert rounding < 1e-3 * effect  # ...and the compiled run moves them the same way, up to rounding

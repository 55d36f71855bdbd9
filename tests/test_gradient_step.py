"""One gradient step: gradient_step is the text a reader edits, and the compiled path that long
runs take by default must follow every edit of it, or of the optimizer, instead of silently
training the unedited arithmetic."""
import pytest
import torch

from conftest import FAST_ENV, TINY, only_run_dir, ppo_discrete, run_main

NEEDS_CXX = pytest.mark.skipif(not ppo_discrete.cpp_compiler_found(), reason="compiling needs a C++ compiler")


def final_weights(script, tmp_path, *flags):
    argv = ["--env-id", FAST_ENV[script.__name__], *TINY, *flags]
    assert run_main(script, argv, tmp_path) == 0
    return torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)["model"]


def edited_gradient_step(script, *, extra_loss=0.0, clip=None):
    """gradient_step as a reader might edit it: an extra loss term (an L2 penalty on the values)
    and another clipping threshold."""

    def step(*, agent, optimizer, mb, args):
        newlogprob, entropy, newvalue = agent.logprob_entropy_value(mb.obs, mb.actions)
        advantages = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
        loss, parts = script.ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=advantages,
                                      newvalue=newvalue, oldvalue=mb.values, value_targets=mb.value_targets,
                                      entropy=entropy, clip_coef=args.clip_coef, vf_coef=args.vf_coef,
                                      ent_coef=args.ent_coef, clip_vloss=args.clip_vloss)
        loss = loss + extra_loss * (newvalue ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm if clip is None else clip)
        optimizer.step()
        return parts

    return step


def adamw(script):
    real = script.make_agent_and_optimizer

    def make(args):
        agent, _ = real(args)
        return agent, torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=0.1)

    return make


EDITS = {
    "an extra loss term": lambda script, mp: mp.setattr(script, "gradient_step", edited_gradient_step(script, extra_loss=1.0)),
    "another clip": lambda script, mp: mp.setattr(script, "gradient_step", edited_gradient_step(script, clip=0.01)),
    "AdamW with weight decay": lambda script, mp: mp.setattr(script, "make_agent_and_optimizer", adamw(script)),
}


@NEEDS_CXX
@pytest.mark.parametrize("edit", EDITS)
def test_the_compiled_path_follows_an_edit_of_the_step(tmp_path, capsys, monkeypatch, edit):
    script = ppo_discrete
    plain = final_weights(script, tmp_path / "plain", "--no-compile")
    EDITS[edit](script, monkeypatch)
    eager = final_weights(script, tmp_path / "eager", "--no-compile")
    assert not all(torch.equal(plain[k], eager[k]) for k in plain)  # the edit changes what is learned
    capsys.readouterr()
    compiled = final_weights(script, tmp_path / "compiled", "--compile")
    err = capsys.readouterr().err
    assert "note: the compiled gradient step was not used: it does not change the weights as gradient_step does" in err
    for key in eager:  # the run trained the edited step, exactly
        assert torch.equal(compiled[key], eager[key]), key


@NEEDS_CXX
def test_the_unedited_compiled_step_proves_itself_and_is_used(script, tmp_path, capsys, monkeypatch):
    calls = []
    real = script.CompiledGradientStep.run_graph
    monkeypatch.setattr(script.CompiledGradientStep, "run_graph", lambda self, mb: calls.append(1) or real(self, mb))
    # 10 iterations, so 10 learning rates as it anneals: the graph must not be guarded on it (it
    # would recompile at every iteration, and fail once past Dynamo's recompile limit of 8).
    final_weights(script, tmp_path, "--compile", "--total-timesteps", "640")
    assert "not used" not in capsys.readouterr().err
    # 10 iterations x 2 epochs x 2 minibatches: the first step creates Adam's state eagerly, the
    # second is the proof (the graph runs once to be compared), the other 38 run the graph.
    assert len(calls) == 39


def test_the_compiled_step_is_gradient_step_for_another_agent(script):
    args = script.RunArgs(env_id=FAST_ENV[script.__name__], num_envs=1, num_steps=8, num_minibatches=1,
                          total_timesteps=8)
    agent, optimizer = script.make_agent_and_optimizer(args)
    other, other_optimizer = script.make_agent_and_optimizer(args)
    step = script.CompiledGradientStep(agent, optimizer, args)
    called = []
    step.run_graph = lambda mb: called.append(1)
    obs_dim = agent.actor[0].in_features
    actions = torch.zeros(8, dtype=torch.long) if script.__name__ == "ppo_discrete" else torch.zeros(8, 1)
    mb = script.Batch(obs=torch.randn(8, obs_dim), actions=actions, logprobs=torch.zeros(8),
                      advantages=torch.randn(8), value_targets=torch.zeros(8), values=torch.zeros(8))
    for _ in range(3):
        step(agent=other, optimizer=other_optimizer, mb=mb, args=args)
    assert called == [] and other_optimizer.state  # the other agent trained, eagerly

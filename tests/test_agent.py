"""The networks: orthogonal init, and the discrete and Gaussian policies' probabilities."""
import math

import numpy as np
import pytest
import torch

from conftest import ppo_continuous, ppo_discrete


def make_agent(script, obs_dim=8, n_act=4, hidden=64):
    torch.manual_seed(0)
    return script.Agent(obs_dim, n_act, hidden)


def linears(net):
    return [m for m in net if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("hidden", [64, 16])
def test_orthogonal_init_with_the_documented_gains(script, hidden):
    agent = make_agent(script, hidden=hidden)
    for net, head_gain in ((agent.actor, 0.01), (agent.critic, 1.0)):
        layers = linears(net)
        assert len(layers) == 3
        for layer, gain in zip(layers, (math.sqrt(2), math.sqrt(2), head_gain)):
            w = layer.weight.detach().double()
            # Orthogonal rows (or columns, whichever are fewer), each of norm `gain`.
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, gain ** 2 * torch.eye(len(gram), dtype=torch.float64),
                                       atol=1e-5, rtol=0)
            assert torch.count_nonzero(layer.bias) == 0


def test_actor_and_critic_share_no_parameters(script):
    agent = make_agent(script)
    actor = {id(p) for p in agent.actor.parameters()}
    assert actor.isdisjoint(id(p) for p in agent.critic.parameters())


class TestDiscretePolicy:
    def test_first_policy_is_near_uniform(self):
        agent = make_agent(ppo_discrete)
        probs = agent.actor(torch.randn(100, 8)).softmax(-1)
        assert (probs - 0.25).abs().max() < 0.05

    def test_logprob_and_entropy_match_torch_categorical(self):
        agent = make_agent(ppo_discrete)
        with torch.no_grad():
            for layer in linears(agent.actor):  # a sharper policy than the initial one
                layer.weight.mul_(50)
        obs, actions = torch.randn(32, 8), torch.randint(0, 4, (32,))
        logprob, entropy, value = agent.logprob_entropy_value(obs, actions)
        dist = torch.distributions.Categorical(logits=agent.actor(obs))
        torch.testing.assert_close(logprob, dist.log_prob(actions))
        torch.testing.assert_close(entropy, dist.entropy())
        assert value.shape == (32,)

    def test_sampled_actions_follow_the_softmax(self):
        agent = make_agent(ppo_discrete)
        with torch.no_grad():
            agent.actor[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]))
        obs = torch.zeros(20000, 8)
        counts = torch.bincount(agent.sample_action(obs), minlength=4).double() / len(obs)
        expected = agent.actor(obs[:1]).softmax(-1)[0].double()
        torch.testing.assert_close(counts, expected.detach(), atol=0.015, rtol=0)

    def test_deterministic_action_is_the_most_probable_one(self):
        agent = make_agent(ppo_discrete)
        with torch.no_grad():  # logits [0, 3, 1, 2] whatever the observation
            agent.actor[-1].weight.zero_()
            agent.actor[-1].bias.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0]))
        assert agent.deterministic_action(torch.randn(64, 8)).tolist() == [1] * 64


def test_value_is_the_critic_output_per_row(script):
    agent = make_agent(script, obs_dim=3)
    with torch.no_grad():  # V(s) = 2 s_0 - s_2 + 0.5, through tanh layers kept near 0 (linear there)
        first, second, last = linears(agent.critic)
        for layer in (first, second, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, 0], first.weight[1, 2] = 1e-3, 1e-3
        second.weight[0, 0], second.weight[1, 1] = 1.0, 1.0
        last.weight[0, 0], last.weight[0, 1] = 2e3, -1e3
        last.bias.fill_(0.5)
    obs = torch.tensor([[1.0, 5.0, 2.0], [-1.0, 0.0, 0.0]])
    if script.__name__ == "ppo_continuous":
        agent.norm_obs = False  # raw observations reach the critic
    torch.testing.assert_close(agent.value(obs), torch.tensor([0.5, -1.5]), atol=1e-3, rtol=0)

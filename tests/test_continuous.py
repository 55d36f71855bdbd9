"""What only the continuous script has: the Gaussian policy, action clipping, normalization."""
import math

import numpy as np
import pytest
import torch

import ppo_continuous as C
from helpers import train_for_test


def tiny_args(**overrides):
    """Pendulum, 2 envs x 32 steps, 2 epochs of 2 minibatches, 2 iterations."""
    settings = dict(env_id="Pendulum-v1", num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2,
                    total_timesteps=128)
    settings.update(overrides)
    return C.Args(**settings)


def agent_with(mean, logstd, obs_dim=3):
    agent = C.Agent(obs_dim, len(mean))
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(torch.tensor(mean))
        agent.actor_logstd.copy_(torch.tensor(logstd))
    return agent


def test_gaussian_logprob_and_entropy_by_hand():
    # mean (0.5, -1), std (2, 1), action (1.5, 0): z = (0.5, 1)
    agent = agent_with([0.5, -1.0], [math.log(2.0), 0.0])
    logprob, entropy, _ = agent.logprob_entropy_value(torch.zeros(1, 3), torch.tensor([[1.5, 0.0]]))
    log_2pi = math.log(2 * math.pi)
    assert logprob.item() == pytest.approx(-0.5 * (0.25 + 1.0) - math.log(2.0) - log_2pi, rel=1e-6)
    assert entropy.item() == pytest.approx(1.0 + log_2pi + math.log(2.0), rel=1e-6)


def test_gaussian_matches_torch_normal_and_samples_have_the_right_moments():
    agent = agent_with([0.3, -0.7], [-0.5, 0.4])
    obs, actions = torch.zeros(8, 3), torch.randn(8, 2)
    logprob, entropy, _ = agent.logprob_entropy_value(obs, actions)
    normal = torch.distributions.Normal(torch.tensor([0.3, -0.7]), torch.tensor([-0.5, 0.4]).exp())
    torch.testing.assert_close(logprob, normal.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, normal.entropy().sum().expand(8))
    torch.manual_seed(0)
    samples = agent.sample_action(torch.zeros(40000, 3))
    torch.testing.assert_close(samples.mean(0), torch.tensor([0.3, -0.7]), atol=0.03, rtol=0)
    torch.testing.assert_close(samples.std(0), normal.stddev, atol=0.03, rtol=0)
    assert torch.equal(agent.deterministic_action(torch.zeros(1, 3))[0], torch.tensor([0.3, -0.7]))


def test_only_the_env_copy_of_the_action_is_clipped(tmp_path, monkeypatch):
    from gymnasium.envs.classic_control.pendulum import PendulumEnv

    received, scored = [], []
    real_step, real_score = PendulumEnv.step, C.Agent.logprob_entropy_value

    def step(self, action):
        received.append(np.array(action))
        return real_step(self, action)

    def score(self, obs, actions):
        scored.append(actions.detach().clone())
        return real_score(self, obs, actions)

    monkeypatch.setattr(PendulumEnv, "step", step)
    monkeypatch.setattr(C.Agent, "logprob_entropy_value", score)
    train_for_test(C, tiny_args(total_timesteps=512, num_steps=128, log_std_init=1.0), tmp_path)
    received = np.concatenate(received)
    stored = torch.cat([a.reshape(-1, 1) for a in scored]).numpy()
    assert np.abs(received).max() == 2.0  # Pendulum's bound, reached: the env saw clipped actions
    assert np.abs(stored).max() > 2.0  # the unclipped samples are what is stored and scored


def test_normalization_statistics_survive_a_checkpoint_and_are_frozen_in_evaluation(tmp_path):
    # The harness end to end: a tiny run of main() writes checkpoint.pt, with both running statistics
    # (observations, and the reward scaler's returns) in the agent's state_dict.
    assert C.main(["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
                   "--update-epochs", "2", "--total-timesteps", "128", "--eval-episodes", "2",
                   "--runs-dir", str(tmp_path / "runs")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    model = C.load_checkpoint(str(run_dir / "checkpoint.pt"))["model"]
    assert model["obs_rms.count"] > 100 and model["return_rms.count"] > 100  # 128 samples each, updated by training
    assert not torch.equal(model["obs_rms.mean"], torch.zeros(3)) and not torch.equal(model["return_rms.var"],
                                                                                      torch.ones(()))
    agent, _ = C.make_agent_and_optimizer(tiny_args())
    agent.load_state_dict(model)
    for key in ("obs_rms.mean", "obs_rms.var", "obs_rms.count", "return_rms.var", "return_rms.count"):
        assert torch.equal(agent.state_dict()[key], model[key])
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    C.evaluate(agent, "Pendulum-v1", 2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in agent.state_dict().items())


def test_the_reward_scaler_divides_by_the_std_of_returns_that_restart_after_each_episode():
    scaler = C.RewardScaler(num_envs=2, gamma=0.5, return_rms=C.RunningMeanStd(()))
    scaler.discounted_return = np.array([10.0, 0.0])
    rewards = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    dones = np.array([[0, 0], [1, 0], [0, 0]])
    scaled = scaler(rewards, dones)
    # env 0 carries 10 in: 6, 4, then a new episode: 1; env 1: 2, 3, 3.5
    returns_seen = np.array([6.0, 2.0, 4.0, 3.0, 1.0, 3.5])
    np.testing.assert_allclose(scaler.discounted_return, [1.0, 3.5])
    # the prior count of 1e-4 (mean 0, var 1) barely moves the statistics of 6 returns
    np.testing.assert_allclose(scaler.return_rms.var.item(), returns_seen.var(), rtol=1e-3)
    np.testing.assert_allclose(scaled, rewards / np.sqrt(returns_seen.var() + 1e-8), rtol=1e-3)
    # one reward far out among 1000 envs: 1e6 / std (about 3e4) is clipped to 10
    rewards = np.zeros((1, 1000))
    rewards[0, 0], rewards[0, 1] = 1e6, 1.0
    scaled = C.RewardScaler(num_envs=1000, gamma=0.5, return_rms=C.RunningMeanStd(()))(rewards, np.zeros((1, 1000)))
    assert scaled[0, 0] == 10.0 and 0 < scaled[0, 1] < 1e-3


def test_running_mean_std_matches_numpy_over_batches():
    rms = C.RunningMeanStd((2,))
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 2))
    for chunk in np.split(data, [7, 100, 230]):
        rms.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(rms.mean.numpy(), data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var.numpy(), data.var(0), rtol=1e-3)


def test_normalization_can_be_turned_off(tmp_path):
    agent = train_for_test(C, tiny_args(norm_obs=False, norm_reward=False), tmp_path)
    assert agent.obs_rms.count < 1 and agent.return_rms.count < 1  # never updated
    obs = torch.randn(4, 3) * 20
    assert torch.equal(agent.normalize(obs), obs)


def test_normalize_by_hand():
    agent = C.Agent(3, 1)
    with torch.no_grad():
        agent.obs_rms.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        agent.obs_rms.var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    # (3 - 1) / 2 = 1, (2 - 2) / 0.5 = 0, (100 - 3) / 1 = 97, clipped to 10
    torch.testing.assert_close(agent.normalize(torch.tensor([[3.0, 2.0, 100.0]])), torch.tensor([[1.0, 0.0, 10.0]]))

"""What the update and the driver do between the math and the probes: shuffling, advantage
normalization, clipping in a real update, the learning-rate schedule, the ratio of the first
minibatch, the flags that reach GAE and the loss, where actions come from, reward scaling."""
import numpy as np
import pytest
import torch

from conftest import FAST_ENV, ppo_continuous
from helpers import train_for_test

DISCRETE = "ppo_discrete"


def is_discrete(script):
    return script.__name__ == DISCRETE


def synthetic_batch(script, n, obs_dim=1, **fields):
    """A Batch of n transitions: zeros, except the fields given."""
    actions = torch.zeros(n, dtype=torch.long) if is_discrete(script) else torch.zeros(n, 1)
    batch = dict(obs=torch.zeros(n, obs_dim), actions=actions, logprobs=torch.zeros(n), advantages=torch.zeros(n),
                 value_targets=torch.zeros(n), values=torch.zeros(n))
    batch.update(fields)
    return script.Batch(**batch)


def small_agent(script, obs_dim=1, seed=0):
    torch.manual_seed(seed)
    return script.Agent(obs_dim, 2 if is_discrete(script) else 1, 16)


def tiny_args(script, **overrides):
    settings = dict(env_id=FAST_ENV[script.__name__], num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2,
                    total_timesteps=256, hidden_size=16)
    settings.update(overrides)
    return script.Args(**settings)


# --- the update ------------------------------------------------------------------------------
def test_each_epoch_sees_every_sample_once_in_a_new_order(script):
    n, epochs, minibatches = 64, 3, 4
    index = torch.arange(n, dtype=torch.float32)
    batch = synthetic_batch(script, n, obs=index[:, None], logprobs=index, advantages=index, value_targets=index,
                            values=index)
    seen = []

    def record(*, agent, optimizer, mb, args):
        seen.append(mb)
        return {"policy_loss": torch.tensor(0.0)}

    args = script.Args(num_envs=4, num_steps=16, num_minibatches=minibatches, update_epochs=epochs)
    agent = small_agent(script)
    script.update(agent=agent, optimizer=torch.optim.Adam(agent.parameters()), batch=batch, args=args,
                  step_fn=record)
    assert len(seen) == epochs * minibatches and all(len(mb.obs) == n // minibatches for mb in seen)
    for mb in seen:  # the fields of a sample stay together
        for field in (mb.logprobs, mb.advantages, mb.value_targets, mb.values):
            assert torch.equal(field, mb.obs[:, 0])
    orders = [torch.cat([mb.obs[:, 0] for mb in seen[e * minibatches:(e + 1) * minibatches]]) for e in range(epochs)]
    for order in orders:
        assert sorted(order.tolist()) == index.tolist()  # each sample exactly once per epoch
        assert not torch.equal(order, index)  # shuffled (a permutation of 64 is the identity with p = 1/64!)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])  # reshuffled per epoch


@pytest.mark.parametrize("norm_adv", [True, False])
def test_advantages_are_normalized_per_minibatch_only_when_asked(script, monkeypatch, norm_adv):
    n, minibatches = 32, 2
    raw = torch.linspace(5.0, 40.0, n) ** 1.5  # mean and std far from 0 and 1
    # value_targets carry a copy of each sample's raw advantage through the shuffle
    batch = synthetic_batch(script, n, advantages=raw, value_targets=raw)
    passed = []
    real_loss = script.ppo_loss

    def recording_loss(**kw):
        passed.append((kw["advantages"].detach().clone(), kw["value_targets"].clone()))
        return real_loss(**kw)

    monkeypatch.setattr(script, "ppo_loss", recording_loss)
    agent = small_agent(script)
    args = script.Args(num_envs=1, num_steps=n, num_minibatches=minibatches, update_epochs=1, norm_adv=norm_adv)
    script.update(agent=agent, optimizer=torch.optim.Adam(agent.parameters()), batch=batch, args=args)
    assert len(passed) == minibatches
    for advantages, raw_in_minibatch in passed:
        x = raw_in_minibatch.double().numpy()
        expected = (x - x.mean()) / x.std(ddof=1) if norm_adv else x  # the minibatch's own mean and std
        np.testing.assert_allclose(advantages.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_clip_stops_an_update_near_one_plus_epsilon(script):
    # Every sample says "more of action a" (advantage +1, not normalized). The clip stops the push
    # once pi(a) / pi_old(a) passes 1 + clip_coef = 1.2; Adam's momentum carries it a little past:
    # 1.235-1.245 on agent seeds 0-4, against 1.50-1.66 with the clip at 100 (no clip).
    n = 64
    agent = small_agent(script)
    action = torch.ones(n, dtype=torch.long) if is_discrete(script) else torch.full((n, 1), 1.0)
    with torch.no_grad():
        old, _, _ = agent.logprob_entropy_value(torch.zeros(n, 1), action)
    batch = synthetic_batch(script, n, actions=action, logprobs=old, advantages=torch.ones(n))
    args = script.Args(num_envs=1, num_steps=n, num_minibatches=4, update_epochs=50, norm_adv=False, ent_coef=0.0,
                       vf_coef=0.0, clip_coef=0.2, max_grad_norm=100.0)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4)
    script.update(agent=agent, optimizer=optimizer, batch=batch, args=args)
    with torch.no_grad():
        new, _, _ = agent.logprob_entropy_value(torch.zeros(1, 1), action[:1])
    ratio = (new - old[:1]).exp().item()
    assert 1.2 < ratio < 1.3, ratio


@pytest.mark.parametrize("clip_vloss", [False, True])
def test_clip_vloss_reaches_the_value_loss(script, clip_vloss):
    # V(s) = 2 everywhere (a zeroed head with bias 2), the old values 1, the targets 3: unclipped
    # the error is 1; clipped, the value counts as 1 + 0.2 = 1.2, an error of 1.8.
    n = 8
    agent = small_agent(script)
    with torch.no_grad():
        agent.critic[-1].weight.zero_()
        agent.critic[-1].bias.fill_(2.0)
    batch = synthetic_batch(script, n, values=torch.ones(n), value_targets=torch.full((n,), 3.0))
    args = script.Args(num_envs=1, num_steps=n, num_minibatches=1, update_epochs=1, clip_vloss=clip_vloss)
    losses = script.update(agent=agent, optimizer=torch.optim.Adam(agent.parameters()), batch=batch, args=args)
    # one minibatch, one epoch: the loss reported is the one before the step
    assert losses["value_loss"] == pytest.approx(0.5 * (1.8 ** 2 if clip_vloss else 1.0), rel=1e-5)


def counted_update(script, agent, optimizer, batch, args):
    """update(); the gradient steps it took, by Adam's own step counter."""
    script.update(agent=agent, optimizer=optimizer, batch=batch, args=args)
    return int(optimizer.state[next(agent.parameters())]["step"])


def kl_batch(script, agent, n):
    """A batch of the agent's own actions with random advantages: any step moves the policy."""
    torch.manual_seed(0)
    obs = torch.randn(n, agent.critic[0].in_features)
    with torch.no_grad():
        actions = agent.sample_action(obs)
        logprobs, _, values = agent.logprob_entropy_value(obs, actions)
    return synthetic_batch(script, n, obs=obs, actions=actions, logprobs=logprobs, advantages=torch.randn(n),
                           values=values, value_targets=values)


@pytest.mark.parametrize("target_kl", [None, 1e-7])
def test_target_kl_stops_the_epochs_after_the_first(script, target_kl):
    agent = small_agent(script, obs_dim=3)
    args = script.Args(num_envs=1, num_steps=64, num_minibatches=2, update_epochs=4, target_kl=target_kl)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    # the first epoch's last minibatch already moved the policy by more than 1e-7
    steps = counted_update(script, agent, optimizer, kl_batch(script, agent, 64), args)
    assert steps == (8 if target_kl is None else 2)


# --- the driver --------------------------------------------------------------------------
def record_steps(script, monkeypatch):
    """Wraps the script's gradient_step: per call, (the learning rate, the largest
    |log pi(a|s) - log pi_old(a|s)| of the minibatch before the step)."""
    calls, real_step = [], script.gradient_step

    def recording_step(*, agent, optimizer, mb, args):
        with torch.no_grad():
            newlogprob, _, _ = agent.logprob_entropy_value(mb.obs, mb.actions)
        # the learning rate is a tensor that train() fills in place: its value now
        calls.append((float(optimizer.param_groups[0]["lr"]), (newlogprob - mb.logprobs).abs().max().item()))
        return real_step(agent=agent, optimizer=optimizer, mb=mb, args=args)

    monkeypatch.setattr(script, "gradient_step", recording_step)
    return calls


@pytest.mark.parametrize("anneal_lr", [True, False])
def test_the_learning_rate_falls_linearly_over_the_iterations(script, tmp_path, monkeypatch, anneal_lr):
    calls = record_steps(script, monkeypatch)
    args = tiny_args(script, learning_rate=0.004, anneal_lr=anneal_lr)  # 4 iterations of 2 x 2 steps
    train_for_test(script, args, tmp_path)
    per_iteration = [calls[i][0] for i in range(0, len(calls), 4)]
    assert len(calls) == 16 and all(calls[i][0] == per_iteration[i // 4] for i in range(16))
    # iteration k of 4 runs at lr x (1 - k / 4): 4, 3, 2, 1 thousandths
    assert per_iteration == pytest.approx([0.004, 0.003, 0.002, 0.001] if anneal_lr else [0.004] * 4)


def test_the_ratio_is_one_on_the_first_minibatch_of_every_update(script, tmp_path, monkeypatch):
    # Old log-probs come from the policy that acted, normalization statistics included: until the
    # first step of an update, the policy is that policy and the ratio is 1 (up to float rounding
    # between a 64-row and a 32-row pass). Observation statistics that moved before the update
    # (the continuous script on Pendulum's raw observations) break it.
    calls = record_steps(script, monkeypatch)
    train_for_test(script, tiny_args(script), tmp_path)
    first = [calls[i][1] for i in range(0, len(calls), 4)]
    later = [calls[i][1] for i in range(len(calls)) if i % 4]
    assert max(first) < 1e-5, first
    assert min(later) > 1e-5, later  # the check can see a moved policy


def test_train_hands_gamma_and_lambda_to_gae(script, tmp_path, monkeypatch):
    seen, real_gae = [], script.compute_gae
    monkeypatch.setattr(script, "compute_gae", lambda **kw: seen.append((kw["gamma"], kw["gae_lambda"])) or real_gae(**kw))
    train_for_test(script, tiny_args(script, gamma=0.77, gae_lambda=0.33), tmp_path)
    assert seen == [(0.77, 0.33)] * 4


def test_the_rollout_takes_the_policy_s_actions(script):
    env_id = FAST_ENV[script.__name__]
    envs = script.make_vector_env([script.make_env(env_id) for _ in range(2)])
    obs_dim = envs.single_observation_space.shape[0]
    act = 2 if is_discrete(script) else envs.single_action_space.shape[0]
    dtype = np.int64 if is_discrete(script) else np.float32

    def actions_of(agent):
        obs, _ = envs.reset(seed=0)
        rollout = script.Rollout.zeros(50, 2, obs_dim, envs.single_action_space.shape, dtype)
        script.collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=0)
        return rollout.actions.reshape(-1)

    torch.manual_seed(0)
    agent = script.Agent(obs_dim, act)
    spread = actions_of(agent)  # the first policy: near-uniform, or a Gaussian of std 1
    assert (np.bincount(spread, minlength=2).min() > 30) if is_discrete(script) else (spread.std() > 0.7)
    with torch.no_grad():  # a sharp policy: action 1, or a Gaussian of mean 0.7, std e^-8
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(torch.tensor([-20.0, 20.0] if is_discrete(script) else [0.7]))
        if not is_discrete(script):
            agent.actor_logstd.fill_(-8.0)
    sharp = actions_of(agent)
    envs.close()
    if is_discrete(script):
        assert (sharp == 1).all()
    else:
        np.testing.assert_allclose(sharp, 0.7, atol=1e-2)


# --- reward scaling (the continuous script) -------------------------------------------------
def test_reward_scaling_divides_by_the_std_of_the_discounted_return_and_clips():
    C = ppo_continuous
    gamma = 0.5
    scaler = C.RewardScaler(num_envs=2, gamma=gamma, return_rms=C.RunningMeanStd(()))
    rewards = np.array([[1.0, -2.0], [3.0, 0.0], [0.0, 4.0], [2.0, 1.0]])
    dones = np.array([[0, 0], [1, 0], [0, 0], [0, 1]], dtype=np.float32)
    # G_t = gamma G_t-1 + r_t per env, restarting after an episode's end (by hand)
    returns = [1.0, 3.5, 0.0, 2.0] + [-2.0, -1.0, 3.5, 2.75]
    scaled = scaler(rewards, dones)
    std = np.std(returns)  # the running statistics' prior (count 1e-4) shifts this by < 1e-4
    np.testing.assert_allclose(scaled, rewards / std, rtol=1e-3)
    assert scaled.dtype == np.float32
    # a second rollout: each env's G carries on (env 1 ended its episode, env 0 did not)
    more = np.array([[1.0, 1.0]])
    returns += [2.0 * gamma + 1.0, 1.0]
    np.testing.assert_allclose(scaler(more, np.zeros((1, 2))), more / np.std(returns), rtol=1e-3)
    # with statistics of many returns of std 0.01, rewards of +/-1 are 100 std: clipped to 10
    scaler.return_rms.var.fill_(1e-4)
    scaler.return_rms.count.fill_(1e6)
    np.testing.assert_array_equal(scaler(np.array([[1.0, -1.0]]), np.zeros((1, 2))), [[10.0, -10.0]])

"""GAE and the PPO loss against hand-computed numbers and an independent reference."""
import inspect
import math

import numpy as np
import pytest
import torch

from conftest import SCRIPTS, ppo_continuous, ppo_discrete

GAMMA, LAMBDA = 0.9, 0.5
# One env, three steps: V(s_t), and V of the true next state at each step.
REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5]
NEXT_VALUES = [1.0, 4.0, 2.0]  # 4.0: V(final observation) of an episode that ends at t = 1


def col(xs):
    return torch.tensor(xs, dtype=torch.float64).unsqueeze(1)  # shape (T, N=1)


def gae(script, terminations, dones, gamma=GAMMA, lam=LAMBDA, rewards=REWARDS, values=VALUES,
        next_values=NEXT_VALUES):
    adv, ret = script.compute_gae(rewards=col(rewards), values=col(values), next_values=col(next_values),
                                  terminations=col(terminations), dones=col(dones), gamma=gamma, gae_lambda=lam)
    return adv.squeeze(1).tolist(), ret.squeeze(1).tolist()


def naive_gae(rewards, values, next_values, terminations, dones, gamma, lam):
    """A_t = sum over k >= t of (gamma lambda)^(k-t) delta_k, while no episode ended in t..k-1."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            for k in range(t, T):
                delta = rewards[k, n] + gamma * (1 - terminations[k, n]) * next_values[k, n] - values[k, n]
                adv[t, n] += (gamma * lam) ** (k - t) * delta
                if dones[k, n]:
                    break
    return adv


def test_twins_share_the_math_text():
    for name in ("compute_gae", "ppo_loss"):
        assert inspect.getsource(getattr(ppo_discrete, name)) == inspect.getsource(getattr(ppo_continuous, name))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
class TestGAE:
    def test_termination_mid_rollout_neither_bootstraps_nor_leaks(self, script):
        # delta = [1 + .9*1 - .5, 2 - 1, 3 + .9*2 - 1.5] = [1.4, 1.0, 3.3]; the sum stops at t = 1
        adv, ret = gae(script, terminations=[0, 1, 0], dones=[0, 1, 0])
        assert adv == pytest.approx([1.4 + 0.45 * 1.0, 1.0, 3.3])
        assert ret == pytest.approx([1.85 + 0.5, 1.0 + 1.0, 3.3 + 1.5])

    def test_truncation_mid_rollout_bootstraps_from_the_final_observation(self, script):
        # delta_1 = 2 + .9 * V(final obs) - 1 = 4.6; the sum still stops at t = 1
        adv, _ = gae(script, terminations=[0, 0, 0], dones=[0, 1, 0])
        assert adv == pytest.approx([1.4 + 0.45 * 4.6, 4.6, 3.3])

    def test_rollout_boundary_bootstraps_the_last_step(self, script):
        adv, _ = gae(script, terminations=[0, 0, 0], dones=[0, 0, 0])
        a2 = 3.3  # 3 + .9 * V(s_3) - 1.5: the last step bootstraps from next_values
        a1 = 4.6 + 0.45 * a2
        assert adv == pytest.approx([1.4 + 0.45 * a1, a1, a2])

    def test_lambda_zero_gives_the_td_errors(self, script):
        adv, _ = gae(script, terminations=[0, 1, 0], dones=[0, 1, 0], lam=0.0)
        assert adv == pytest.approx([1.4, 1.0, 3.3])

    def test_lambda_one_gives_discounted_return_plus_bootstrap(self, script):
        rng = np.random.default_rng(0)
        T, gamma = 6, 0.97
        rewards, v = rng.normal(size=T), rng.normal(size=T + 1)
        adv, ret = gae(script, [0] * T, [0] * T, gamma=gamma, lam=1.0, rewards=rewards.tolist(),
                       values=v[:-1].tolist(), next_values=v[1:].tolist())
        for t in range(T):
            mc = sum(gamma ** (k - t) * rewards[k] for k in range(t, T)) + gamma ** (T - t) * v[T]
            assert ret[t] == pytest.approx(mc)
            assert adv[t] == pytest.approx(mc - v[t])

    def test_matches_naive_double_sum_on_random_rollouts(self, script):
        rng = np.random.default_rng(1)
        T, N = 20, 3
        dones = (rng.random((T, N)) < 0.2).astype(float)
        terminations = dones * (rng.random((T, N)) < 0.5)  # some endings are truncations
        rewards, values, next_values = rng.normal(size=(3, T, N))
        expected = naive_gae(rewards, values, next_values, terminations, dones, 0.99, 0.95)
        t = torch.tensor
        adv, ret = script.compute_gae(rewards=t(rewards), values=t(values), next_values=t(next_values),
                                      terminations=t(terminations), dones=t(dones), gamma=0.99, gae_lambda=0.95)
        np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-10, atol=1e-10)


RATIOS = [1.5, 0.5, 1.1, 0.7]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0]
NEW_V, OLD_V, TARGETS = [1.0, 2.0, 3.0, 4.0], [1.5, 1.5, 3.0, 3.0], [0.0, 3.0, 3.0, 6.0]
ENTROPY = [1.0, 1.0, 0.5, 0.5]


def loss_of(script, clip_vloss, ent_coef=0.01, vf_coef=0.5, newlogprob=None):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    newlogprob = t([math.log(r) for r in RATIOS]) if newlogprob is None else newlogprob
    return script.ppo_loss(newlogprob=newlogprob, oldlogprob=t([0.0] * 4), advantages=t(ADVANTAGES),
                           newvalue=t(NEW_V), oldvalue=t(OLD_V), value_targets=t(TARGETS), entropy=t(ENTROPY),
                           clip_coef=0.2, vf_coef=vf_coef, ent_coef=ent_coef, clip_vloss=clip_vloss)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
class TestLoss:
    def test_clipped_surrogate_inside_and_outside_the_range(self, script):
        # A>0: min(1.5, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5 (unclipped, pessimistic);
        # A<0: min(-1.1, -1.1) = -1.1 (inside), min(-0.7, -0.8) = -0.8 (clipped). Negated, averaged.
        _, parts = loss_of(script, clip_vloss=False)
        assert parts["policy_loss"].item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
        assert parts["clipfrac"].item() == pytest.approx(0.75)  # 1.5, 0.5 and 0.7 lie outside 1 +/- 0.2

    def test_no_gradient_through_the_clipped_side(self, script):
        newlogprob = torch.tensor([math.log(r) for r in RATIOS], dtype=torch.float64, requires_grad=True)
        loss, _ = loss_of(script, clip_vloss=False, ent_coef=0.0, vf_coef=0.0, newlogprob=newlogprob)
        loss.backward()
        # d(-A r / 4)/d log r = -A r / 4 where the unclipped term is the active one, else 0
        assert newlogprob.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0])

    def test_value_loss_unclipped_is_half_mse(self, script):
        _, parts = loss_of(script, clip_vloss=False)
        assert parts["value_loss"].item() == pytest.approx(0.5 * (1 + 1 + 0 + 4) / 4)

    def test_value_loss_clipped_takes_the_larger_error(self, script):
        # clipped values: 1.5-.2 = 1.3, 1.5+.2 = 1.7, 3.0, 3.0+.2 = 3.2; squared errors
        # max(1, 1.69), max(1, 1.69), 0, max(4, 7.84)
        _, parts = loss_of(script, clip_vloss=True)
        assert parts["value_loss"].item() == pytest.approx(0.5 * (1.69 + 1.69 + 0 + 7.84) / 4)

    def test_total_combines_the_terms_with_their_coefficients(self, script):
        # policy_loss 0.05 (above), entropy 0.75, value_loss 0.75 unclipped and 1.4025 clipped (above):
        # loss = policy_loss - 0.1 x entropy + 0.7 x value_loss
        for clip_vloss, expected in ((False, 0.05 - 0.075 + 0.525), (True, 0.05 - 0.075 + 0.7 * 1.4025)):
            loss, parts = loss_of(script, clip_vloss=clip_vloss, ent_coef=0.1, vf_coef=0.7)
            assert parts["entropy"].item() == pytest.approx(0.75)
            assert loss.item() == pytest.approx(expected)

    def test_kl_estimates_are_the_exact_kl_on_a_sample_with_the_old_frequencies(self, script):
        # Actions drawn exactly in the old policy's proportions p = (1/2, 1/4, 1/4): the sample mean
        # of either estimator is then E_p[-log(q/p)] = KL(p || q), as E_p[q/p - 1] = 0.
        p, q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
        actions = torch.tensor([0, 0, 1, 2])
        zeros = torch.zeros(4, dtype=torch.float64)
        _, parts = script.ppo_loss(newlogprob=q.log()[actions], oldlogprob=p.log()[actions], advantages=zeros,
                                   newvalue=zeros, oldvalue=zeros, value_targets=zeros, entropy=zeros,
                                   clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=False)
        exact = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                                  torch.distributions.Categorical(probs=q)).item()
        assert parts["approx_kl"].item() == pytest.approx(exact)
        assert parts["old_approx_kl"].item() == pytest.approx(exact)
        assert set(parts) == {"policy_loss", "value_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"}
        assert all(not part.requires_grad for part in parts.values())

    def test_kl_estimate_stays_positive_where_the_naive_one_goes_negative(self, script):
        # One action, ratio 2: -log r = -0.693 (negative), (r - 1) - log r = 1 - 0.693 = 0.307
        one = torch.ones(1, dtype=torch.float64)
        _, parts = script.ppo_loss(newlogprob=torch.log(2 * one), oldlogprob=0 * one, advantages=one,
                                   newvalue=one, oldvalue=one, value_targets=one, entropy=one,
                                   clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=False)
        assert parts["old_approx_kl"].item() == pytest.approx(-0.693147, abs=1e-6)
        assert parts["approx_kl"].item() == pytest.approx(0.306853, abs=1e-6)

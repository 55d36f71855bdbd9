"""Probe environments: tiny envs with one known answer each, learned through the scripts' own
training code (Andy Jones, "Debugging RL, Without the Agonizing Pain"; rejax and AgileRL ship
the same idea as tests). Each probe has a Discrete(2) and a Box(1) action variant, registered
with Gymnasium so that the scripts' make_env builds it, and trains in a second or two.

What each probe isolates, when it fails:
  ProbeConstant    V = 1: the critic and its value targets
  ProbeObsReward   V(obs) = obs: the critic reads the observation
  ProbeObsReward4  rewards of +/-4 scaled by their std (continuous, --norm-reward): V = +/-1
  ProbeDiscount    V(first state) = gamma: discounting, and the bootstrap from the next state
  ProbeAction      the best action: the policy gradient's sign and wiring
  ProbeObsAction   the best action per observation: actions paired with their observations
  ProbeTimeLimit   V = 1 / (1 - gamma) under a TimeLimit: truncation bootstraps
"""
import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ppo_continuous
from helpers import train_for_test

GAMMA = 0.9  # of the discount probe: V(first state) = 0.9, far from 1 (gamma ignored) and 0
TIME_LIMIT, TIME_GAMMA = 3, 0.8  # V = 1 / (1 - 0.8) = 5; a truncation taken for an ending gives 1.75


class Probe(gym.Env):
    """One-dimensional observation; a Discrete(2) or a Box([-1, 1]) action. Subclasses set
    first_obs() and outcome(action) -> (reward, next observation or None when the episode ends)."""

    def __init__(self, continuous=False):
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)
        self.continuous = continuous
        self.obs = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.obs = self.first_obs()
        return np.array([self.obs], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        a = float(np.asarray(action).reshape(-1)[0])
        reward, next_obs = self.outcome(a)
        terminated = next_obs is None
        self.obs = self.obs if terminated else next_obs
        return np.array([self.obs], dtype=np.float32), float(reward), terminated, False, {}

    def first_obs(self):
        return 0.0

    def random_sign(self):
        return float(self.np_random.choice([-1.0, 1.0]))


class ProbeConstant(Probe):
    """One step, reward +1, whatever the action."""

    def outcome(self, a):
        return 1.0, None


class ProbeObsReward(Probe):
    """Observation -1 or +1 at random, one step, reward = the observation."""

    def first_obs(self):
        return self.random_sign()

    def outcome(self, a):
        return self.obs, None


class ProbeObsReward4(ProbeObsReward):
    """As ProbeObsReward, with rewards of -4 or +4: for reward scaling."""

    def outcome(self, a):
        return 4.0 * self.obs, None


class ProbeDiscount(Probe):
    """Two steps: observation 0, then 1; reward 0, then 1 at the end."""

    def outcome(self, a):
        return (0.0, 1.0) if self.obs == 0.0 else (1.0, None)


class ProbeAction(Probe):
    """One step. Discrete: reward 1 for action 1, 0 for action 0. Box: reward -(a - 0.5)^2,
    best at a = 0.5 (inside the bounds, so the mean must find it, not just run to a bound)."""

    def outcome(self, a):
        return (-(a - 0.5) ** 2 if self.continuous else float(a == 1)), None


class ProbeObsAction(Probe):
    """Observation -1 or +1 at random, one step. Discrete: reward 1 for action 1 on +1 and
    action 0 on -1, else 0. Box: reward -(a - 0.5 obs)^2, best at a = 0.5 x obs."""

    def first_obs(self):
        return self.random_sign()

    def outcome(self, a):
        if self.continuous:
            return -(a - 0.5 * self.obs) ** 2, None
        return float(a == (self.obs > 0)), None


class ProbeTimeLimit(Probe):
    """Never ends by itself: reward 1 a step, observation 0; the TimeLimit cuts it."""

    def outcome(self, a):
        return 1.0, 0.0


def probe_id(script, probe):
    box = script.__name__ == "ppo_continuous"
    name = f"{probe.__name__}{'Box' if box else ''}-v0"
    if name not in gym.registry:
        limit = TIME_LIMIT if probe is ProbeTimeLimit else None
        gym.register(name, entry_point=probe, max_episode_steps=limit, kwargs={"continuous": box})
    return name


def train_probe(script, probe, tmp_path, **overrides):
    """A run of 8 iterations of 8 envs x 32 steps, 8 epochs each, 16-wide layers, a high
    learning rate: about a second. Seeds 0-9 all met the tolerances below with room to spare
    (the worst: 0.01 off a value, 0.03 off a Box action, the time-limit V at 4.83)."""
    settings = dict(env_id=probe_id(script, probe), total_timesteps=2048, num_envs=8, num_steps=32,
                    num_minibatches=4, update_epochs=8, learning_rate=1e-2, hidden_size=16, seed=1)
    if script.__name__ == "ppo_continuous":
        # V is learned on raw rewards: reward scaling would change what V means
        settings.update(norm_reward=False)
    settings.update(overrides)
    return train_for_test(script, script.Args(**settings), tmp_path)


def values(agent, *observations):
    with torch.no_grad():
        return agent.value(torch.tensor([[o] for o in observations], dtype=torch.float32)).tolist()


def actions(agent, *observations):
    with torch.no_grad():
        return agent.deterministic_action(torch.tensor([[o] for o in observations], dtype=torch.float32)).tolist()


def probabilities(agent, *observations):
    """The discrete policy's probability of each action, per observation."""
    with torch.no_grad():
        return agent.actor(torch.tensor([[o] for o in observations], dtype=torch.float32)).softmax(-1).tolist()


# Values: seeds 0-9 were within 0.01 of the answer; 0.05 leaves room for float drift across
# machines and is far below any wrong answer (0 untrained, or another probe's value).
VALUE_TOL = 0.05
# Box actions: seeds 0-9 were within 0.03 of the best action; 0.1 still tells 0.5 from 0 (the
# untrained mean) and from the bound 1.
ACTION_TOL = 0.1


def test_the_critic_learns_a_constant_value(script, tmp_path):
    agent = train_probe(script, ProbeConstant, tmp_path)
    assert values(agent, 0.0) == pytest.approx([1.0], abs=VALUE_TOL)


def test_the_critic_learns_a_value_that_depends_on_the_observation(script, tmp_path):
    agent = train_probe(script, ProbeObsReward, tmp_path)
    assert values(agent, -1.0, 1.0) == pytest.approx([-1.0, 1.0], abs=VALUE_TOL)


def test_with_reward_scaling_the_critic_learns_the_scaled_return(tmp_path):
    # Returns of -4 or +4 have a std of 4: scaled rewards are -1 or +1, and so is V (not -4, +4).
    # Seeds 0-9 were within 0.011 of -1 and +1.
    agent = train_probe(ppo_continuous, ProbeObsReward4, tmp_path, norm_reward=True)
    assert values(agent, -1.0, 1.0) == pytest.approx([-1.0, 1.0], abs=VALUE_TOL)


def test_the_critic_discounts_the_next_state(script, tmp_path):
    agent = train_probe(script, ProbeDiscount, tmp_path, gamma=GAMMA)
    assert values(agent, 0.0, 1.0) == pytest.approx([GAMMA, 1.0], abs=VALUE_TOL)


def test_the_policy_learns_the_best_action(script, tmp_path):
    agent = train_probe(script, ProbeAction, tmp_path)
    if script.__name__ == "ppo_discrete":
        assert actions(agent, 0.0) == [1]
        # seeds 0-9 gave it probability 0.999 or more; an untrained policy gives 0.5
        assert probabilities(agent, 0.0)[0][1] > 0.9
    else:
        assert actions(agent, 0.0)[0] == pytest.approx([0.5], abs=ACTION_TOL)


def test_the_policy_conditions_on_the_observation(script, tmp_path):
    agent = train_probe(script, ProbeObsAction, tmp_path)
    if script.__name__ == "ppo_discrete":
        assert actions(agent, -1.0, 1.0) == [0, 1]
        p = probabilities(agent, -1.0, 1.0)
        assert p[0][0] > 0.9 and p[1][1] > 0.9  # seeds 0-9: 0.998 or more; untrained: 0.5
    else:
        assert [a[0] for a in actions(agent, -1.0, 1.0)] == pytest.approx([-0.5, 0.5], abs=ACTION_TOL)


def test_a_time_limit_is_bootstrapped_not_taken_for_an_ending(script, tmp_path):
    # Rewards of 1 forever: V = 1 / (1 - gamma) = 5 at every step. Were the TimeLimit's cut taken
    # for a termination, V would be the mean return to the cut, (1 + 1.8 + 2.44) / 3 = 1.75.
    # Seeds 0-9 reached 4.83-4.88 (V climbs towards 5 from below); 0.4 keeps clear of 1.75.
    agent = train_probe(script, ProbeTimeLimit, tmp_path, gamma=TIME_GAMMA)
    assert values(agent, 0.0) == pytest.approx([1 / (1 - TIME_GAMMA)], abs=0.4)

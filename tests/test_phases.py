"""The wiring between the phases: collect_rollout and make_batch driven with tiny envs whose
episodes end by a time limit (truncation) or by reaching a goal (termination)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

LIMIT = 3  # every episode lasts 3 steps
T, N = 7, 2  # episodes end at t = 2 and t = 5; the rollout boundary cuts the third one


class Counter(gym.Env):
    """Observation [steps taken in this episode, 1.0]; reward 1 a step. With `terminate_at`,
    the episode terminates after that many steps; without, only a TimeLimit ends it."""

    def __init__(self, continuous=False, terminate_at=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)
        self.terminate_at, self.t = terminate_at, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 1.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([self.t, 1.0], dtype=np.float32), 1.0, terminated, False, {}


def env_id(script, ending):
    kind = script.__name__.split("_")[1]
    name = f"Counter{kind.title()}{ending.title()}-v0"
    if name not in gym.registry:
        continuous = kind == "continuous"
        if ending == "truncated":
            gym.register(name, entry_point=Counter, max_episode_steps=LIMIT, kwargs={"continuous": continuous})
        else:
            gym.register(name, entry_point=Counter, kwargs={"continuous": continuous, "terminate_at": LIMIT})
    return name


class PositionCritic(torch.nn.Module):
    """V(s) = 10 x the step count in the observation, so that V(final observation) = 30 differs
    from V(first observation of the next episode) = 0. Log-probs and entropies are 0."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def value(self, obs):
        return self.scale * obs[..., 0]

    def logprob_entropy_value(self, obs, actions):
        zeros = torch.zeros(len(obs))
        return zeros, zeros, self.value(obs)


def collect(script, ending, seed=0):
    env = env_id(script, ending)
    envs = script.make_vector_env([script.make_env(env) for _ in range(N)])
    obs, _ = envs.reset(seed=seed)
    torch.manual_seed(seed)
    agent = script.Agent(2, envs.single_action_space.shape[0] if envs.single_action_space.shape else 2)
    dtype = np.int64 if script.__name__ == "ppo_discrete" else np.float32
    rollout = script.Rollout.zeros(T, N, 2, envs.single_action_space.shape, dtype)
    obs, episodes = script.collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=100)
    envs.close()
    return rollout, obs, episodes


@pytest.mark.parametrize("ending", ["truncated", "terminated"])
def test_the_rollout_stores_each_episode_end_with_its_final_observation(script, ending):
    rollout, obs, episodes = collect(script, ending)
    ends = np.array([0, 0, 1, 0, 0, 1, 0], dtype=np.float32)[:, None].repeat(N, 1)
    np.testing.assert_array_equal(rollout.terminations, ends if ending == "terminated" else 0 * ends)
    np.testing.assert_array_equal(rollout.truncations, ends if ending == "truncated" else 0 * ends)
    steps_in_episode = np.array([0, 1, 2, 0, 1, 2, 0], dtype=np.float32)[:, None]
    np.testing.assert_array_equal(rollout.obs[..., 0], steps_in_episode.repeat(N, 1))
    # s_t+1 of an ended episode is its final observation (3 steps), not the next one's first (0)
    np.testing.assert_array_equal(rollout.next_obs[..., 0], (steps_in_episode + 1).repeat(N, 1))
    np.testing.assert_array_equal(obs[:, 0], [1, 1])  # where the next rollout starts
    np.testing.assert_array_equal(rollout.rewards, np.ones((T, N)))
    # each env ended two episodes of 3 steps, at global steps 100 + 3 N and 100 + 6 N, cut by the
    # time limit (truncated) or not
    cut = ending == "truncated"
    assert sorted(episodes) == sorted([script.Episode(100 + 3 * N, 3.0, 3, cut)] * N
                                      + [script.Episode(100 + 6 * N, 3.0, 3, cut)] * N)


@pytest.mark.parametrize("ending", ["truncated", "terminated"])
def test_the_batch_bootstraps_a_truncation_from_the_final_observation_only(script, ending):
    rollout, _, _ = collect(script, ending)
    batch = script.make_batch(agent=PositionCritic(), rollout=rollout, rewards=rollout.rewards, gamma=0.5,
                              gae_lambda=1.0)
    # With lambda = 1 the value target is the discounted return to the episode's end, plus, after
    # a truncation or the rollout boundary, gamma^k V(s_t+k). Rewards are 1, V(s) = 10 x steps.
    if ending == "truncated":
        per_episode = [1 + 0.5 * (1 + 0.5 * (1 + 0.5 * 30)), 1 + 0.5 * (1 + 0.5 * 30), 1 + 0.5 * 30]
    else:
        per_episode = [1 + 0.5 * (1 + 0.5), 1 + 0.5, 1.0]
    expected = np.array(per_episode * 2 + [1 + 0.5 * 10])  # the last step: cut by the rollout boundary
    targets = batch.value_targets.reshape(T, N).numpy()
    np.testing.assert_allclose(targets, expected[:, None].repeat(N, 1), rtol=1e-6)
    values = 10 * rollout.obs[..., 0]
    np.testing.assert_allclose(batch.advantages.reshape(T, N).numpy(), targets - values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch.obs.numpy(), rollout.obs.reshape(T * N, 2))  # row t * N + n
    np.testing.assert_array_equal(batch.values.numpy(), values.reshape(-1))


def test_the_batch_scores_the_actions_the_rollout_took(script):
    rollout, _, _ = collect(script, "truncated")
    torch.manual_seed(1)
    agent = script.Agent(2, 1 if script.__name__ == "ppo_continuous" else 2)
    batch = script.make_batch(agent=agent, rollout=rollout, rewards=rollout.rewards, gamma=0.9, gae_lambda=0.9)
    np.testing.assert_array_equal(batch.actions.numpy(), rollout.actions.reshape(T * N, *rollout.actions.shape[2:]))
    for row in (0, 5, T * N - 1):  # one transition at a time gives the same log-prob
        logprob, _, _ = agent.logprob_entropy_value(batch.obs[row:row + 1], batch.actions[row:row + 1])
        torch.testing.assert_close(batch.logprobs[row:row + 1], logprob.detach())

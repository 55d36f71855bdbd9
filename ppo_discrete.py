"""PPO for discrete actions, in one file: LunarLander-v3 by default.

Usage
    python ppo_discrete.py --total-timesteps 2000000   # train, checkpoint, then evaluate (--help: every flag)
    python ppo_discrete.py --resume runs/RUN/checkpoint.pt   # or --eval-checkpoint PATH [--capture-video]

Words used below: an iteration collects a rollout of num_steps steps in each of num_envs envs (one
batch), then optimises on it; an epoch is one pass over the batch in shuffled minibatches; a minibatch
(batch_size // num_minibatches transitions) is one gradient step; global_step counts env steps, all envs.

Reading guide. To learn PPO, read sections 1-7 in order: 1 Args (the flags), 2 the env, 3 the Agent,
4 compute_gae, 5 ppo_loss, 6 one iteration (collect_rollout -> make_batch -> update, a gradient_step
per minibatch), 7 evaluate, what is logged, and train(), the PPO paper's Algorithm 1. Nothing in them
uses anything defined later, and nothing after them (8, the harness: run folder, checkpoints, Ctrl-C,
resume, main) changes what is learned. The twin, ppo_continuous.py, has a Gaussian policy and
normalizes observations and rewards; what both define is the same text but for a short list
(tests/test_twins.py).

References: PPO, Schulman et al. 2017 (arXiv:1707.06347); GAE, Schulman et al. 2016 (arXiv:1506.02438);
Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track), cited as [37-n].
"""

import signal

if __name__ == "__main__":  # Ctrl-C outside training (imports included): a quiet exit, not a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import io  # noqa: E402 (after the handler)
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

SCRIPT = "ppo_discrete"


# 1. Hyperparameters ------------------------------------------------------------------------------
@dataclass
class Args:
    """The algorithm's flags. Where a default differs from CleanRL's ppo.py (tuned for CartPole) the
    comment says why: most are rl-baselines3-zoo's LunarLander settings, which beat cheaper variants
    in our trials (benchmark/RESULTS.md); the annealing is CleanRL's (the zoo's rate is constant)."""

    env_id: str = "LunarLander-v3"  # Gymnasium id of an env with Discrete actions and flat Box observations
    seed: int = 1  # seed of torch, numpy, random and the training envs (env i gets seed + i)
    cuda: bool = False  # train on the GPU (CleanRL's default is on; 64-wide MLPs train faster on the CPU)
    total_timesteps: int = 2_000_000  # environment steps to train for, over all envs
    # CleanRL: 2.5e-4. Annealed to learning_rate / num_iterations at the end: late landings settle.
    learning_rate: float = 3e-4  # Adam learning rate at the start (annealed linearly towards 0 with --anneal-lr)
    # CleanRL: 4 x 128. A 16-row forward costs about what a 4-row one does; 16384 steps span many episodes.
    num_envs: int = 16  # parallel envs in the (synchronous) vector env
    num_steps: int = 1024  # steps per env in each rollout
    anneal_lr: bool = True  # anneal the learning rate linearly towards 0 over training [37-4]
    # CleanRL: 0.99, 0.95. Landing pays +100 hundreds of steps after the approach: 1 / (1 - gamma) sees it.
    gamma: float = 0.999  # discount factor
    gae_lambda: float = 0.98  # lambda of Generalized Advantage Estimation
    # CleanRL: 4 (of 128). Minibatches of 64; of 128 ended 32 and 50 points lower in two trials.
    num_minibatches: int = 256  # minibatches per epoch
    update_epochs: int = 4  # passes over each batch
    norm_adv: bool = True  # normalize advantages within each minibatch [37-7]
    clip_coef: float = 0.2  # surrogate clipping coefficient epsilon (also the value clip range with --clip-vloss)
    # CleanRL: on. It did not help, or hurt, in Andrychowicz et al. 2021 (sec. 3.2); the zoo is off.
    clip_vloss: bool = False  # clip the value loss around the old values [37-9]
    ent_coef: float = 0.01  # entropy bonus coefficient
    vf_coef: float = 0.5  # value loss coefficient
    max_grad_norm: float = 0.5  # global gradient-norm clipping threshold [37-11]
    target_kl: Optional[float] = None  # stop an iteration's epochs early once approx_kl exceeds this (off when unset)
    hidden_size: int = 64  # width of the two hidden layers of the actor and of the critic
    compile: bool = True  # torch.compile gradient_step itself (LeanRL's way) where it pays: see `compiles`

    # Derived: computed, never flags (CleanRL overwrites such flags silently)
    batch_size = property(lambda self: self.num_envs * self.num_steps)
    minibatch_size = property(lambda self: self.batch_size // self.num_minibatches)
    num_iterations = property(lambda self: self.total_timesteps // self.batch_size)
    device = property(lambda self: torch.device("cuda" if self.cuda else "cpu"))
    # Compiling (~20 s) is won back after ~60,000 gradient steps (benchmark/RESULTS.md): shorter runs stay eager.
    compiles = property(lambda self: self.compile and self.num_iterations * self.update_epochs * self.num_minibatches
                        >= 60_000)

    def check(self) -> Optional[str]:
        """The first flag that cannot train, as one line saying what to do; None if all can."""
        rules = [("finite", lambda x: not isinstance(x, float) or math.isfinite(x), [f.name for f in fields(self)]),
                 ("positive", lambda x: x > 0, "total_timesteps num_envs num_steps num_minibatches update_epochs "
                  "hidden_size learning_rate clip_coef max_grad_norm".split()),  # finite first: nan is never > 0
                 ("0 or more", lambda x: x >= 0, ["ent_coef", "vf_coef"]),
                 ("in [0, 1]", lambda x: 0 <= x <= 1, ["gamma", "gae_lambda"]),
                 ("in [0, 2^31)", lambda x: 0 <= x < 2**31, ["seed"]),  # env seeds count up from it
                 ("positive (leave it out to turn it off)", lambda x: x is None or x > 0, ["target_kl"])]
        for what, ok, names in rules:
            if bad := next((name for name in names if not ok(getattr(self, name))), None):
                return f"--{bad.replace('_', '-')} must be {what}, got {getattr(self, bad)}"
        if self.batch_size % self.num_minibatches:
            return (f"the batch of {self.batch_size} (--num-envs x --num-steps) does not split into "
                    f"{self.num_minibatches} equal minibatches: change --num-minibatches")
        if self.norm_adv and self.minibatch_size < 2:
            return f"minibatches of {self.minibatch_size} cannot normalize advantages: lower --num-minibatches"
        if self.total_timesteps < self.batch_size:
            return (f"--total-timesteps {self.total_timesteps} is less than one batch of {self.batch_size} "
                    "(--num-envs x --num-steps): raise it or shrink the batch")
        return None


# 2. Environment ----------------------------------------------------------------------------------
def make_env(env_id: str, video_dir: Optional[str] = None, video_trigger=None):
    """A thunk that builds one env; video_dir records mp4s (by default of episodes 0, 1, 8, 27, ..., 1000, 2000...)."""

    def thunk():
        env = gym.make(env_id, render_mode="rgb_array") if video_dir else gym.make(env_id)  # only if needed
        if video_dir is not None:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=video_trigger, disable_logger=True)
        return gym.wrappers.RecordEpisodeStatistics(env)  # the return and length, in the last step's info

    return thunk


def make_vector_env(env_fns) -> gym.vector.SyncVectorEnv:
    # SyncVectorEnv: on 2 cores AsyncVectorEnv's inter-process traffic costs more than it gains. SAME_STEP
    # autoreset: an episode's last step returns the next episode's first observation and puts the true last
    # one in infos["final_obs"], so no dummy step is stored (the 1.x default, NEXT_STEP, inserts one after
    # each episode) and a truncation can bootstrap from it.
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# 3. Agent ----------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)  # orthogonal weights scaled by std, zero biases [37-2]
    nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(n_in: int, n_out: int, hidden_size: int, out_std: float) -> nn.Sequential:
    """Two tanh hidden layers [37-2]; out_std scales the last layer's initial weights."""
    return nn.Sequential(layer_init(nn.Linear(n_in, hidden_size)), nn.Tanh(),
                         layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
                         layer_init(nn.Linear(hidden_size, n_out), std=out_std))


class Agent(nn.Module):
    """Separate actor and critic MLPs (no shared trunk [37-13]): obs (B, obs_dim) -> logits (B, n), values (B,)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_size: int = 64):
        super().__init__()
        self.critic = mlp(obs_dim, 1, hidden_size, out_std=1.0)
        self.actor = mlp(obs_dim, n_actions, hidden_size, out_std=0.01)  # 0.01: a near-uniform first policy [37-2]

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def sample_action(self, obs: torch.Tensor) -> torch.Tensor:
        """One action per row, drawn from softmax(logits): what Categorical(logits=...).sample() draws,
        without building that object at every env step (a tenth of the run's time, benchmark/RESULTS.md)."""
        return torch.multinomial(self.actor(obs).softmax(-1), 1).squeeze(-1)

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The most probable action (argmax of the logits): the policy evaluation plays."""
        return self.actor(obs).argmax(-1)

    def logprob_entropy_value(self, obs: torch.Tensor, action: torch.Tensor):
        """log pi(action|obs), the policy's entropy and V(obs), each of shape (B,)."""
        logp = self.actor(obs).log_softmax(-1)
        logprob = logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        return logprob, -(logp.exp() * logp).sum(-1), self.value(obs)


# 4. Advantages -----------------------------------------------------------------------------------
def compute_gae(*, rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """Generalized Advantage Estimation (GAE paper, eq. 16): TD errors, then a discounted sum.

    Float tensors of shape (T, N), T steps of N envs: rewards[t] follows the action at t; values[t] is
    V(s_t); next_values[t] is V of the true s_t+1 (an ended episode's final observation, never the next
    one's first); terminations[t] is 1 if s_t+1 is terminal (no bootstrap); dones[t] is 1 if the episode
    ended at t, terminated or truncated (the sum stops there): a truncation still bootstraps from
    V(final observation). Returns (advantages, value_targets = advantages + values), each (T, N)."""
    # delta_t = r_t + gamma * V(s_t+1) * (1 - terminal) - V(s_t)
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    # A_t = delta_t + gamma * lambda * A_t+1, cut where the episode ended; A_T = 0 past the end.
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in reversed(range(len(deltas))):
        running = deltas[t] + gamma * gae_lambda * (1.0 - dones[t]) * running
        advantages[t] = running
    return advantages, advantages + values


# 5. PPO loss -------------------------------------------------------------------------------------
def ppo_loss(*, newlogprob, oldlogprob, advantages, newvalue, oldvalue, value_targets, entropy,
             clip_coef, vf_coef, ent_coef, clip_vloss):
    """The PPO objective on one minibatch, as a loss to minimise; tensors 1-D over the minibatch,
    advantages already normalized when that is on. Returns (loss, parts): parts holds its terms
    and diagnostics as detached 0-d tensors, by CleanRL's TensorBoard names."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    # Clipped surrogate (PPO paper, eq. 7): the pessimistic minimum, as the maximum of the negatives
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)).mean()
    v_loss = 0.5 * (newvalue - value_targets) ** 2
    if clip_vloss:  # the new value may move at most clip_coef from the old one without paying for it [37-9]
        v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
        v_loss = torch.max(v_loss, 0.5 * (v_clipped - value_targets) ** 2)
    v_loss = v_loss.mean()
    # CleanRL's name, though it is a bonus: the mean entropy, subtracted from the loss below.
    entropy_loss = entropy.mean()
    # PPO paper, eq. 9, with the entropy bonus and the value loss weighted
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    with torch.no_grad():
        parts = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy_loss.detach(),
                 # Two estimators of KL(old || new) [37-12]: Schulman's unbiased, never negative
                 # (r - 1) - log r, and the older naive -log r, logged as old_approx_kl
                 "approx_kl": ((ratio - 1.0) - logratio).mean(), "old_approx_kl": (-logratio).mean(),
                 "clipfrac": ((ratio - 1.0).abs() > clip_coef).float().mean()}
    return loss, parts


# 6. One iteration: collect a rollout, turn it into a batch, update the agent on it ---------------
class Rollout(NamedTuple):
    """One rollout: numpy arrays (T, N, ...), refilled each iteration (rows are cheap to write in numpy)."""
    obs: np.ndarray           # s_t, what the agent acted on
    actions: np.ndarray       # a_t
    rewards: np.ndarray       # r_t, received after a_t
    next_obs: np.ndarray      # the true s_t+1: an ended episode's final observation, not the reset one
    terminations: np.ndarray  # 1 if s_t+1 is terminal (the episode ended in the env's own terms)
    truncations: np.ndarray   # 1 if a time limit cut the episode at s_t+1 (if both are 1, it is terminal)

    @classmethod
    def zeros(cls, num_steps: int, num_envs: int, obs_dim: int, action_shape: tuple, action_dtype) -> "Rollout":
        zeros = lambda *shape, dtype=np.float32: np.zeros((num_steps, num_envs, *shape), dtype=dtype)  # noqa: E731
        return cls(obs=zeros(obs_dim), actions=zeros(*action_shape, dtype=action_dtype), rewards=zeros(),
                   next_obs=zeros(obs_dim), terminations=zeros(), truncations=zeros())


class Episode(NamedTuple):
    global_step: int  # when it ended
    episode_return: float  # undiscounted sum of its rewards
    length: int
    truncated: bool  # cut by a time limit, not terminal


def collect_rollout(*, envs, agent: nn.Module, obs: np.ndarray, rollout: Rollout, global_step: int) -> tuple:
    """Phase 1: act with the current policy for T steps in each of the N envs, from obs (N, obs_dim), filling
    `rollout`. Returns (the observations to act on next, the episodes that ended)."""
    device = next(agent.parameters()).device
    num_steps, num_envs = rollout.rewards.shape
    episodes = []
    with torch.inference_mode():  # no autograd bookkeeping while acting
        for step in range(num_steps):
            rollout.obs[step] = obs = np.asarray(obs, dtype=np.float32)
            action = agent.sample_action(torch.from_numpy(obs).to(device)).cpu().numpy()
            obs, reward, terminated, truncated, infos = envs.step(action)
            rollout.actions[step], rollout.rewards[step] = action, reward
            rollout.terminations[step], rollout.truncations[step] = terminated, truncated
            rollout.next_obs[step] = obs
            # Gymnasium 1.x infos: a dict of arrays over the envs, each key with a mask "_key" of the envs it
            # holds. SAME_STEP autoreset: `obs` already starts the next episode in the envs that just ended
            # one; their true s_t+1 is in final_obs (to bootstrap a truncation), and RecordEpisodeStatistics
            # put the return and length in final_info["episode"].
            if "final_obs" in infos:
                ended = np.flatnonzero(infos["_final_obs"])
                rollout.next_obs[step, ended] = np.stack(infos["final_obs"][ended])
                stats = infos["final_info"]["episode"]
                for i in np.flatnonzero(infos["final_info"]["_episode"]):
                    episodes.append(Episode(global_step + (step + 1) * num_envs, float(stats["r"][i]),
                                            int(stats["l"][i]), bool(truncated[i] and not terminated[i])))
    return obs, episodes


class Batch(NamedTuple):
    """A rollout flattened to T*N transitions, with what the loss needs; each field (T*N, ...)."""
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor       # log pi_old(a_t|s_t), under the policy that acted
    advantages: torch.Tensor     # GAE
    value_targets: torch.Tensor  # advantages + values: what the critic learns to predict
    values: torch.Tensor         # V_old(s_t), for value clipping and the explained variance


def make_batch(*, agent: nn.Module, rollout: Rollout, rewards: np.ndarray, gamma: float, gae_lambda: float) -> Batch:
    """Phase 2: old log-probs and values (one batched pass: the policy did not change during the rollout),
    GAE, and flattening. rewards (T, N): rollout.rewards, or a scaled copy."""
    device = next(agent.parameters()).device
    T, N = rollout.rewards.shape
    as_tensor = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    obs, actions = as_tensor(rollout.obs).flatten(0, 1), as_tensor(rollout.actions).flatten(0, 1)
    with torch.no_grad():
        logprobs, _, values = agent.logprob_entropy_value(obs, actions)
        advantages, value_targets = compute_gae(
            rewards=as_tensor(rewards), values=values.reshape(T, N),
            next_values=agent.value(as_tensor(rollout.next_obs)), terminations=as_tensor(rollout.terminations),
            dones=as_tensor(np.maximum(rollout.terminations, rollout.truncations)), gamma=gamma, gae_lambda=gae_lambda)
    return Batch(obs=obs, actions=actions, logprobs=logprobs, advantages=advantages.flatten(),
                 value_targets=value_targets.flatten(), values=values)


def gradient_step(*, agent: nn.Module, optimizer: torch.optim.Optimizer, mb: Batch, args: Args) -> dict:
    """One minibatch: the loss, its gradient clipped to a global norm [37-11], the optimizer's step; ppo_loss's
    parts. The one text of the step, compiled or not: edit it here."""
    newlogprob, entropy, newvalue = agent.logprob_entropy_value(mb.obs, mb.actions)
    advantages = mb.advantages
    if args.norm_adv:  # per minibatch [37-7]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=advantages, newvalue=newvalue,
                           oldvalue=mb.values, value_targets=mb.value_targets, clip_vloss=args.clip_vloss,
                           entropy=entropy, clip_coef=args.clip_coef, vf_coef=args.vf_coef, ent_coef=args.ent_coef)
    optimizer.zero_grad()
    loss.backward()
    # foreach, and Adam's fused=True: one kernel for all parameters, not a loop (benchmark/RESULTS.md)
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
    optimizer.step()
    return parts


def update(*, agent: nn.Module, optimizer, batch: Batch, args: Args, step_fn=gradient_step) -> dict[str, float]:
    """Phase 3: update_epochs passes over the batch in shuffled minibatches, a step_fn each
    (gradient_step, or torch.compile of it). Returns ppo_loss's parts, averaged over the steps."""
    parts_per_step = []
    for epoch in range(args.update_epochs):
        perm = torch.randperm(args.batch_size, device=batch.obs.device)  # each transition in one minibatch
        for start in range(0, args.batch_size, args.minibatch_size):
            mb = Batch(*(x[perm[start:start + args.minibatch_size]] for x in batch))
            parts = step_fn(agent=agent, optimizer=optimizer, mb=mb, args=args)
            parts_per_step.append(torch.stack(list(parts.values())))
        # Early stopping on the KL of the last minibatch [37-12]; .item() waits for the device.
        if args.target_kl is not None and parts["approx_kl"].item() > args.target_kl:
            break
    return dict(zip(parts, torch.stack(parts_per_step).mean(0).tolist()))


# 7. Training and evaluation ----------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: nn.Module, env_id: str, n_episodes: int, seed: int, device="cpu",
             video_dir: Optional[str] = None, max_envs: int = 25) -> np.ndarray:
    """Returns of n_episodes episodes of the deterministic policy. Env i of min(n_episodes, max_envs) is
    seeded seed + i and plays a fixed share (the first n episodes to end would favour short ones)."""
    n_envs = min(n_episodes, max_envs)
    quota = [n_episodes // n_envs + (i < n_episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env([make_env(env_id, video_dir if i == 0 else None, lambda ep: ep < quota[0])
                            for i in range(n_envs)])
    eval_returns: list[list[float]] = [[] for _ in range(n_envs)]
    obs, _ = envs.reset(seed=seed)
    while any(len(r) < q for r, q in zip(eval_returns, quota)):
        action = agent.deterministic_action(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        for i in np.flatnonzero(infos["final_info"]["_episode"]) if "final_info" in infos else []:
            if len(eval_returns[i]) < quota[i]:
                eval_returns[i].append(float(infos["final_info"]["episode"]["r"][i]))
    envs.close()
    return np.array([r for per_env in eval_returns for r in per_env])


def make_agent_and_optimizer(args: Args) -> tuple[Agent, torch.optim.Optimizer]:
    random.seed(args.seed)  # before the weights are drawn
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = gym.make(args.env_id)  # for its sizes
    agent = Agent(env.observation_space.shape[0], int(env.action_space.n), args.hidden_size).to(args.device)
    env.close()
    # eps: [37-3]. fused: one kernel for all parameters. The learning rate is a tensor (float64, as a
    # Python float is) that the schedule changes in place: a compiled step is not recompiled for it.
    lr = torch.tensor(args.learning_rate, dtype=torch.float64, device=args.device)
    return agent, torch.optim.Adam(agent.parameters(), lr=lr, eps=1e-5, fused=True)


def final_step(args: Args, global_step: int = 0) -> int:  # after the last whole batch within total_timesteps
    return global_step + (args.total_timesteps - global_step) // args.batch_size * args.batch_size


def learning_rate_at(args: Args, global_step: int, last_step: int) -> float:
    """Linear annealing [37-4]: learning_rate at 0, learning_rate * batch_size / last_step at the end."""
    return args.learning_rate * (1.0 - global_step / last_step if args.anneal_lr else 1.0)


def log_iteration(writer, *, global_step: int, episodes: list[Episode], losses: dict, batch: Batch,
                  learning_rate: float, sps: float) -> None:
    """TensorBoard scalars under CleanRL's tags, against env steps: a new scalar is one more line here."""
    for episode in episodes:
        writer.add_scalar("charts/episodic_return", episode.episode_return, episode.global_step)
        writer.add_scalar("charts/episodic_length", episode.length, episode.global_step)
    writer.add_scalar("charts/learning_rate", learning_rate, global_step)
    writer.add_scalar("charts/SPS", sps, global_step)
    for name, value in losses.items():
        writer.add_scalar(f"losses/{name}", value, global_step)
    # 1 - Var(targets - values) / Var(targets): 1 is a perfect critic, 0 no better than a constant
    residual, targets = (batch.value_targets - batch.values).var().item(), batch.value_targets.var().item()
    writer.add_scalar("losses/explained_variance", 1 - residual / targets if targets > 0 else math.nan, global_step)


def train(args: Args, agent: Agent, optimizer: torch.optim.Optimizer, envs=None, global_step: int = 0,
          writer=None, after_iteration=None) -> int:
    """PPO (the paper's Algorithm 1) from global_step (0, or a resumed run's) to final_step; returns the step
    reached. writer: TensorBoard's or None; after_iteration(global_step=, episodes=, losses=): True stops."""
    envs = envs or make_vector_env([make_env(args.env_id) for _ in range(args.num_envs)])
    start_step, start_time, last_step = global_step, time.perf_counter(), final_step(args, global_step)
    # Env i starts from seed + i; a resumed run starts its new episodes from fresh seeds.
    obs, _ = envs.reset(seed=args.seed + global_step // args.num_steps)
    rollout = Rollout.zeros(args.num_steps, args.num_envs, envs.single_observation_space.shape[0], (), np.int64)
    step_fn = torch.compile(gradient_step) if args.compiles else gradient_step  # the same text, traced
    while global_step < last_step:
        lr = learning_rate_at(args, global_step, last_step)
        optimizer.param_groups[0]["lr"].fill_(lr)
        obs, episodes = collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=global_step)
        batch = make_batch(agent=agent, rollout=rollout, rewards=rollout.rewards, gamma=args.gamma,
                           gae_lambda=args.gae_lambda)
        losses = update(agent=agent, optimizer=optimizer, batch=batch, args=args, step_fn=step_fn)
        global_step += args.batch_size
        if writer is not None:
            log_iteration(writer, global_step=global_step, episodes=episodes, losses=losses, batch=batch,
                          learning_rate=lr, sps=(global_step - start_step) / (time.perf_counter() - start_time))
        if after_iteration is not None and after_iteration(global_step=global_step, episodes=episodes, losses=losses):
            break
    envs.close()
    return global_step


# 8. The harness ---------------------------------------------------------------------------------
# Run control, checkpoints, Ctrl-C, resume, evaluation, the command line: nothing below changes what is learned.
MAY_CHANGE = ("total_timesteps", "cuda", "compile")  # the algorithm's flags a resumed run may change


class RunError(Exception):
    """RunError(line, code=2): one line for the user, and the exit code (2: bad input, 1: a fault)."""


@dataclass
class RunArgs(Args):
    """Every flag: the algorithm's (Args), then these, which never change what is learned."""

    exp_name: str = SCRIPT  # name of the experiment: part of the run folder's name
    runs_dir: str = "runs"  # folder of the run folders (TensorBoard logs, checkpoints, videos)
    capture_video: bool = False  # record mp4s of the final evaluation (or of --eval-checkpoint) in the run folder
    eval_episodes: int = 100  # episodes of the final deterministic evaluation, and of --eval-checkpoint
    eval_every: int = 0  # evaluate (eval_episodes / 5 episodes) every N iterations, keep the best as best.pt (0: off)
    target_return: Optional[float] = None  # stop once a periodic evaluation reaches it (default: 40 of them)
    checkpoint_every: int = 50  # write checkpoint.pt every N iterations (also at the end and on Ctrl-C)
    resume: Optional[str] = None  # checkpoint.pt of a run to continue, in its folder, with its flags
    eval_checkpoint: Optional[str] = None  # evaluate this checkpoint's deterministic policy, without training

    def check(self) -> Optional[str]:
        if min(self.eval_episodes, self.checkpoint_every) < 1 or self.eval_every < 0:
            return "--eval-episodes and --checkpoint-every must be positive, --eval-every 0 or more"
        if self.cuda and not torch.cuda.is_available():
            return "--cuda was given but torch sees no CUDA device: drop --cuda"
        if self.compiles and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
            return "torch.compile needs a C++ compiler (g++, clang++ or $CXX): install one, or pass --no-compile"
        return super().check()


def check_env(env_id: str) -> Optional[str]:
    """Whether env_id can be trained by this script: None, or a one-line error."""
    try:
        env = gym.make(env_id)
    except Exception as e:  # unknown id, a missing package (box2d, ...), a bug in the env
        return f"cannot make env {env_id!r} ({(str(e).strip() or type(e).__name__).splitlines()[0]}): pick another"
    obs, space = env.observation_space, env.action_space
    env.close()
    if isinstance(space, gym.spaces.Discrete) and space.start == 0 and isinstance(obs, gym.spaces.Box) and len(
            obs.shape) == 1:
        return None
    return f"{env_id} has observations {obs} and actions {space}: this script needs a flat Box and Discrete(n)" + (
        " (Box actions: ppo_continuous.py)" if isinstance(space, gym.spaces.Box) else "")


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, read without running code from it (weights_only)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, a folder, truncated, not a torch file, holds more than tensors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise RunError(f"cannot read {path} as a checkpoint ({reason}): give a run's checkpoint.pt") from None
    if not isinstance(data, dict) or data.get("script") != SCRIPT or not isinstance(data.get("args"), dict):
        other = data.get("script") if isinstance(data, dict) else None
        raise RunError(f"{path} is not a checkpoint of {SCRIPT}.py" + (f" but of {other}.py" if other else ""))
    return data


class Harness:
    """A run from the command line: its checkpoint restored; train() with after_iteration (divergence check,
    progress, periodic evaluations, best.pt, --target-return, checkpoints); Ctrl-C; the final evaluation."""

    def __init__(self, args: RunArgs, run_dir: str, agent: Agent, optimizer, data: Optional[dict], path: str):
        self.args, self.run_dir, self.agent, self.optimizer, self.writer = args, run_dir, agent, optimizer, None
        self.global_step, self.iteration, self.best_eval, self.intact = 0, 0, -math.inf, "nothing was saved yet"
        try:  # the weights, the optimizer and torch's RNG (the only one training draws from)
            if data:
                agent.load_state_dict(data["model"])
                optimizer.load_state_dict(data["optimizer"])
                torch.set_rng_state(data["rng"])
                self.global_step, self.iteration, self.best_eval = map(data.get, ("global_step", "iteration", "best_eval"))
                assert all(p.isfinite().all() for p in agent.parameters()) and self.global_step >= 0
                self.intact = f"{path} (step {self.global_step:,}) is intact"
        except Exception as e:  # RuntimeError: tensors of other shapes; KeyError, TypeError ...: a damaged file
            raise RunError(f"{path} does not fit {args.env_id} with hidden layers of {args.hidden_size} "
                           f"({type(e).__name__}): it is damaged, or the env changed") from None
        self.final, self.signum, self.returns = final_step(args, self.global_step), 0, deque(maxlen=20)
        self.last_print, self.last_step = time.perf_counter(), self.global_step

    def __call__(self, signum, frame):
        if self.signum:  # a second Ctrl-C: at once; checkpoint.pt stays the last one written whole
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration (again: quit now)",
              file=sys.stderr)

    def train(self) -> None:
        """train() with this hook, this signal handler and TensorBoard; a write error is one line."""
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when training
        args, step = self.args, self.global_step
        print(f"{SCRIPT}: {args.env_id}, batches of {args.batch_size} (minibatches of {args.minibatch_size}) to step "
              f"{self.final:,}; run dir {self.run_dir}" + "\ncompiling gradient_step: ~20 s more" * args.compiles)
        handlers = {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:  # on resume, TensorBoard drops what the run logged after its checkpoint
            self.writer = SummaryWriter(self.run_dir, purge_step=step + 1 if step else None)
            if not step:
                self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                    f"|{k}|{v}|" for k, v in asdict(args).items()))
            train(args, self.agent, self.optimizer, None, step, self.writer, self.after_iteration)
            self.writer.close()
        except OSError as e:  # TensorBoard's files
            raise RunError(f"cannot write in {self.run_dir} ({e.strerror or e}); {self.intact}", 1) from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def after_iteration(self, *, global_step: int, episodes: list, losses: dict[str, float]) -> bool:
        args, reached, now = self.args, False, time.perf_counter()
        if not (math.isfinite(sum(losses.values())) and all(p.isfinite().all() for p in self.agent.parameters())):
            raise RunError(f"training diverged (a non-finite loss or weight) after step {self.global_step:,}; "
                           f"{self.intact}. Try a --learning-rate below {args.learning_rate}", 1)
        self.global_step, self.iteration = global_step, self.iteration + 1
        self.returns.extend(episode.episode_return for episode in episodes)
        if now - self.last_print >= 5 or global_step >= self.final:  # a progress line every 5 s
            sps = (global_step - self.last_step) / (now - self.last_print)
            print(f"step {global_step:>10,}/{self.final:,} | {sps:6,.0f} steps/s | return "
                  f"{np.mean(self.returns) if self.returns else math.nan:8.1f} (last 20 episodes) | ETA "
                  f"{time.strftime('%H:%M:%S', time.gmtime((self.final - global_step) / sps))}", flush=True)
            self.last_print, self.last_step = now, global_step
        if args.eval_every and self.iteration % args.eval_every == 0:
            returns = evaluate(self.agent, args.env_id, max(1, args.eval_episodes // 5), args.seed + 10**6, args.device)
            self.writer.add_scalar("eval/mean_return", returns.mean(), global_step)
            print(f"eval at step {global_step:,}: {returns.mean():.1f} +/- {returns.std():.1f}", flush=True)
            if returns.mean() > self.best_eval:
                self.best_eval = float(returns.mean())
                self.save("best.pt")
            if reached := args.target_return is not None and returns.mean() >= args.target_return:
                print(f"--target-return {args.target_return} reached at step {global_step:,}", flush=True)
        if self.iteration % args.checkpoint_every == 0 or global_step >= self.final or reached or self.signum:
            self.save("checkpoint.pt")
        return bool(self.signum or reached)

    def save(self, name: str) -> None:
        buffer = io.BytesIO()  # into memory first: torch.save's own writer raises RuntimeError on a full disk
        torch.save({"script": SCRIPT, "args": asdict(self.args), "model": self.agent.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(), "global_step":
                    self.global_step, "iteration": self.iteration, "best_eval": self.best_eval}, buffer)
        self.write(name, buffer.getvalue())
        if name == "checkpoint.pt":
            self.intact = f"{self.run_dir}/checkpoint.pt (step {self.global_step:,}) is intact"

    def write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.run_dir, name)  # atomically: a crash or a full disk leaves the old file whole
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        except OSError as e:
            raise RunError(f"cannot write {path} ({e.strerror or e}): stopped; {self.intact}", 1) from None

    def final_evaluation(self, video_dir: Optional[str], write: bool) -> int:
        """The deterministic evaluation (seeds far from training's), printed, and written to evaluation.json."""
        args = self.args
        print(f"evaluation: {args.eval_episodes} episodes of the deterministic policy", flush=True)
        try:
            returns = evaluate(self.agent, args.env_id, args.eval_episodes, args.seed + 10**6, args.device, video_dir)
        except OSError as e:  # the video writer: a full disk, a read-only folder
            raise RunError(f"cannot write the videos into {video_dir} ({e.strerror or e}); {self.intact}", 1) from None
        print(f"evaluation: {returns.mean():.1f} +/- {returns.std():.1f} over {len(returns)} episodes", flush=True)
        if write:
            self.write("evaluation.json", json.dumps(dict(global_step=self.global_step, mean=float(returns.mean()),
                                                          std=float(returns.std()), returns=returns.tolist())).encode())
        return 0


def run(argv: list[str]) -> int:
    """Check everything (before anything is written), then train or evaluate a checkpoint; the exit code."""
    import tyro

    args = tyro.cli(RunArgs, args=argv, description=__doc__.split("\n\n")[0])
    if args.resume and args.eval_checkpoint:
        raise RunError("give --resume or --eval-checkpoint, not both")
    data = load_checkpoint(path) if (path := args.resume or args.eval_checkpoint) else None
    if data:  # the run's own flags; the command line gives run control, and may change MAY_CHANGE
        saved = {f.name: data["args"].get(f.name) for f in fields(Args)}
        args = tyro.cli(RunArgs, args=argv, default=replace(args, **saved))
        if changed := [n for n, v in saved.items() if n not in MAY_CHANGE and getattr(args, n) != v]:
            raise RunError(f"--{changed[0].replace('_', '-')}: a checkpoint keeps its run's flags; only "
                           f"{', '.join('--' + n.replace('_', '-') for n in MAY_CHANGE)} may change")
    if (error := args.check()) or (error := check_env(args.env_id)):
        raise RunError(error)
    if args.target_return is not None and not args.eval_every:
        args = replace(args, eval_every=max(1, args.num_iterations // 40))
    name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.dirname(os.path.abspath(path)) if data else os.path.join(args.runs_dir, name)
    harness = Harness(args, run_dir, *make_agent_and_optimizer(args), data, path)
    if args.eval_checkpoint:
        return harness.final_evaluation(f"{run_dir}/videos/eval_checkpoint" if args.capture_video else None, False)
    step, evaluation = harness.global_step, f"{run_dir}/evaluation.json"
    if harness.final > step:
        try:
            os.makedirs(run_dir, exist_ok=bool(data))
        except OSError as e:  # FileExistsError: a run of the same name started in the same second
            raise RunError(f"cannot create {run_dir} ({e.strerror}): give another --runs-dir or --exp-name") from None
        harness.train()
    elif os.path.exists(evaluation) and json.load(open(evaluation))["global_step"] == step:
        raise RunError(f"this run is finished at step {step:,}: raise --total-timesteps to train on")
    if harness.signum:
        print(f"stopped at step {harness.global_step:,}; checkpoint saved. Resume with:\n  python {SCRIPT}.py "
              f"--resume {run_dir}/checkpoint.pt", file=sys.stderr)
        return 128 + harness.signum
    harness.final_evaluation(f"{run_dir}/videos/eval" if args.capture_video else None, True)
    print(f"run dir: {run_dir}\n  tensorboard --logdir {os.path.dirname(run_dir)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    torch.set_num_threads(1)  # for 64-wide layers a second thread costs more in sync than it gains
    logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)  # "profiler hook ignored"
    try:  # Ctrl-C outside training (set quiet above) stops at once: nothing is left to save
        return run(sys.argv[1:] if argv is None else list(argv))
    except RunError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return e.args[1] if len(e.args) > 1 else 2


if __name__ == "__main__":
    sys.exit(main())

"""PPO for discrete actions, in one file: LunarLander-v3 by default.

Usage
    python ppo_discrete.py --total-timesteps 2000000         # train, checkpoint, then evaluate
    python ppo_discrete.py --env-id Acrobot-v1 --total-timesteps 500000   # -82 (solved: -100)
    python ppo_discrete.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
    python ppo_discrete.py --resume runs/RUN/checkpoint.pt  # continue an interrupted run
    python ppo_discrete.py --help                           # every flag, with its meaning

Words used below
    iteration    collect a rollout of num_steps steps in each of num_envs envs (one batch),
                 then optimise on it
    epoch        one pass over the whole batch, in shuffled minibatches
    minibatch    batch_size // num_minibatches transitions: one gradient step
    global_step  environment steps taken so far, counted over all envs

Reading guide. To learn PPO, read sections 1-7 in order; nothing in them refers to anything
defined later, and nothing in them is there for anything but PPO.
    1 Hyperparameters   Args: the algorithm's flags, their checks, derived sizes
    2 Environment       make_env, make_vector_env (the autoreset mode matters), env_shapes
    3 Agent             layer_init, Agent: a categorical actor and a critic
    4 Advantages        compute_gae
    5 PPO loss          ppo_loss
    6 One iteration     collect_rollout -> make_batch -> update (a gradient_step per minibatch)
    7 Training          evaluate, then train(): the loop of the PPO paper's Algorithm 1
    8 The harness       run-control flags, progress lines, evaluations, checkpoint files,
                        signals, resume, the compiled gradient step, main(): what makes it a
                        tool; a reader learning PPO can stop before it
The twin, ppo_continuous.py, differs in the policy (a Gaussian), action clipping and
observation and reward normalization. Every function both files define is the same text, apart
from a short list that differs because the action space does (tests/test_twins.py).

References: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347);
Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv:1506.02438);
Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track), cited as [37-n].
"""

import os
import signal

if __name__ == "__main__":  # Ctrl-C during the imports below exits at once: raised as KeyboardInterrupt
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # it could land in native code

import errno  # noqa: E402 (the imports after the handler)
import importlib.util
import io
import json
import math
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import typing
import warnings
import zipfile
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

try:  # these take a second or two: Ctrl-C meanwhile exits quietly, like Ctrl-C anywhere else
    import gymnasium as gym
    import numpy as np
    import torch
    import torch.nn as nn
except KeyboardInterrupt:
    sys.exit(130)

SCRIPT = "ppo_discrete"
CHECKPOINT_FORMAT = 3


# 1. Hyperparameters ------------------------------------------------------------------------------
@dataclass
class Args:
    """The algorithm's flags. Where a default differs from CleanRL's ppo.py (tuned for CartPole),
    the comment says why: these are rl-baselines3-zoo's LunarLander settings, which beat cheaper
    variants in our trials (benchmark/RESULTS.md). Run control (checkpoints, evaluations,
    --resume, ...) has its own flags in section 8."""

    env_id: str = "LunarLander-v3"  # Gymnasium id of an env with a Discrete action space and a flat Box observation
    seed: int = 1  # seed of torch, numpy, random and the training envs (env i gets seed + i)
    torch_deterministic: bool = True  # set torch.backends.cudnn.deterministic (only cuDNN kernels on a GPU care)
    cuda: bool = False  # train on the GPU (CleanRL's default is on; 64-wide MLPs train faster on the CPU)
    total_timesteps: int = 2_000_000  # environment steps to train for, over all envs
    # CleanRL: 2.5e-4; 3e-4 is the zoo's value. The annealing lowers it every iteration, to
    # learning_rate / num_iterations in the last one, which settles the landing late.
    learning_rate: float = 3e-4  # Adam learning rate at the start (annealed linearly towards 0 with --anneal-lr)
    # CleanRL: 4 x 128. More envs: a 16-row forward costs about what a 4-row one does. Longer
    # rollouts: a batch of 16384 steps spans many of Lunar Lander's episodes (up to 1000 steps).
    num_envs: int = 16  # parallel envs in the (synchronous) vector env
    num_steps: int = 1024  # steps per env in each rollout
    anneal_lr: bool = True  # anneal the learning rate linearly towards 0 over training [37-4]
    # CleanRL: 0.99 and 0.95. Landing pays its +100 hundreds of steps after the approach
    # began: a longer horizon (1 / (1 - gamma) = 1000 steps) sees it.
    gamma: float = 0.999  # discount factor
    gae_lambda: float = 0.98  # lambda of Generalized Advantage Estimation
    # CleanRL: 4 (of 128). Minibatches of 64: one gradient step per 16 samples. Minibatches of
    # 128 trained 25% faster but ended 32 and 50 points lower in two trials on seed 2.
    num_minibatches: int = 256  # minibatches per epoch
    update_epochs: int = 4  # passes over each batch
    norm_adv: bool = True  # normalize advantages within each minibatch [37-7]
    clip_coef: float = 0.2  # surrogate clipping coefficient epsilon (also the value clip range with --clip-vloss)
    # CleanRL: on. Value clipping did not help, or hurt, in Andrychowicz et al. 2021 (sec. 3.2);
    # the zoo does not clip either.
    clip_vloss: bool = False  # clip the value loss around the old values [37-9]
    ent_coef: float = 0.01  # entropy bonus coefficient
    vf_coef: float = 0.5  # value loss coefficient
    max_grad_norm: float = 0.5  # global gradient-norm clipping threshold [37-11]
    target_kl: Optional[float] = None  # stop an iteration's epochs early once approx_kl exceeds this (off when unset)
    hidden_size: int = 64  # width of the two hidden layers of the actor and of the critic

    # Derived sizes: computed, never flags (CleanRL overwrites such flags silently).
    batch_size = property(lambda self: self.num_envs * self.num_steps)
    minibatch_size = property(lambda self: self.batch_size // self.num_minibatches)
    num_iterations = property(lambda self: self.total_timesteps // self.batch_size)

    def check(self) -> Optional[str]:
        """The first flag that cannot train, as one line saying what to do; None if all can."""
        # Any float flag first: inf or nan would train silently into NaN weights.
        rules = [(f.name, lambda x: not isinstance(x, float) or math.isfinite(x), "a finite number") for f in fields(self)]
        rules += [("total_timesteps num_envs num_steps num_minibatches update_epochs hidden_size learning_rate "
                  "clip_coef max_grad_norm", lambda x: x > 0, "positive"), ("ent_coef vf_coef", lambda x: x >= 0,
                  "0 or more"), ("gamma gae_lambda", lambda x: 0 <= x <= 1, "lie in [0, 1]"),
                 ("seed", lambda x: 0 <= x < 2**31, "lie in [0, 2^31)"),  # env seeds count up from it
                 ("target_kl", lambda x: x is None or x > 0, "positive (leave it out to turn it off)")]
        for name, ok, what in ((n, ok, what) for names, ok, what in rules for n in names.split()):
            if not ok(getattr(self, name)):
                verb = what if what.startswith("lie") else f"be {what}"
                return f"--{name.replace('_', '-')} must {verb}, got {getattr(self, name)}"
        if self.batch_size % self.num_minibatches:
            return (f"the batch of {self.batch_size} (--num-envs x --num-steps) does not split into "
                    f"{self.num_minibatches} equal minibatches: change --num-minibatches")
        if self.norm_adv and self.minibatch_size < 2:
            return (f"minibatches of {self.minibatch_size} cannot normalize advantages: lower "
                    "--num-minibatches or pass --no-norm-adv")
        if self.total_timesteps < self.batch_size:
            return (f"--total-timesteps {self.total_timesteps} is less than one batch of "
                    f"{self.batch_size} (--num-envs x --num-steps): raise it or shrink the batch")
        return None


# 2. Environment ----------------------------------------------------------------------------------
def make_env(env_id: str, video_dir: Optional[str] = None, video_trigger=None, render_mode: Optional[str] = None):
    """A thunk that builds one env; `video_dir` records its episodes as mp4."""

    def thunk():
        # A render mode only when one is needed: an env that cannot render need not accept it.
        mode = "rgb_array" if video_dir is not None else render_mode
        env = gym.make(env_id, render_mode=mode) if mode else gym.make(env_id)
        if video_dir is not None:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=video_trigger,
                                           disable_logger=True)
        # Puts the episode's return and length into the info of its last step.
        return gym.wrappers.RecordEpisodeStatistics(env)

    return thunk


def make_vector_env(env_fns) -> gym.vector.SyncVectorEnv:
    # SyncVectorEnv: on 2 cores AsyncVectorEnv's inter-process traffic costs more than it gains.
    # SAME_STEP autoreset: an episode's last step returns the next episode's first observation and
    # puts the true last one in infos["final_obs"], so no dummy step is stored (the 1.x default,
    # NEXT_STEP, inserts one after each episode) and a truncation can bootstrap from it.
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def env_shapes(env_id: str) -> tuple[int, int]:
    """(observation size, number of actions)."""
    env = gym.make(env_id)
    obs_dim, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    env.close()
    return obs_dim, n_actions


# 3. Agent ----------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)  # orthogonal weights scaled by std, zero biases [37-2]
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs (no shared trunk [37-13]).

    obs: (B, obs_dim) float32. The actor gives (B, n_actions) logits, the critic (B,) values.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden_size: int = 64):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
            # A 0.01 scale makes the first policy near-uniform over actions [37-2].
            layer_init(nn.Linear(hidden_size, n_actions), std=0.01),
        )

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def sample_action(self, obs: torch.Tensor) -> torch.Tensor:
        """One action per row, drawn from softmax(logits)."""
        # The draw Categorical(logits=...).sample() makes, without building that object at
        # every env step, which made the headline run about a tenth slower (benchmark/RESULTS.md).
        return torch.multinomial(self.actor(obs).softmax(-1), 1).squeeze(-1)

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The most probable action (argmax of the logits): the policy evaluation plays."""
        return self.actor(obs).argmax(-1)

    def logprob_entropy_value(self, obs: torch.Tensor, action: torch.Tensor):
        """log pi(action|obs), the policy's entropy and V(obs), each of shape (B,)."""
        logp = self.actor(obs).log_softmax(-1)
        logprob = logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logprob, entropy, self.value(obs)


# 4. Advantages -----------------------------------------------------------------------------------
def compute_gae(*, rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """Generalized Advantage Estimation (GAE paper, eq. 16): TD errors, then a discounted sum.

    Float tensors of shape (T, N), T steps of N envs: rewards[t] follows the action at t; values[t]
    is V(s_t); next_values[t] is V of the true s_t+1 (an ended episode's final observation, never
    the next one's first); terminations[t] is 1 if s_t+1 is terminal (no bootstrap); dones[t] is 1
    if the episode ended at t, terminated or truncated (the sum stops there). A truncation has
    dones = 1 but terminations = 0: it still bootstraps from V(final observation). Returns
    (advantages, value_targets = advantages + values, what the critic learns), each (T, N).
    """
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
    advantages already normalized when that is on. Returns (loss, parts): parts holds pg_loss,
    v_loss, entropy_loss, approx_kl, old_approx_kl and clipfrac as detached 0-d tensors."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    # Clipped surrogate (PPO paper, eq. 7): the pessimistic minimum, as the maximum of the negatives
    pg_loss = torch.max(-advantages * ratio,
                        -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)).mean()
    if clip_vloss:
        # The new value may move at most clip_coef from the old one without paying for it [37-9].
        v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((newvalue - value_targets) ** 2, (v_clipped - value_targets) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - value_targets) ** 2).mean()
    # CleanRL's name, though it is a bonus: the mean entropy, subtracted from the loss below.
    entropy_loss = entropy.mean()
    # PPO paper, eq. 9, with the entropy bonus and the value loss weighted
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    with torch.no_grad():
        parts = {
            "pg_loss": pg_loss.detach(),
            "v_loss": v_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            # Two estimators of KL(old || new) [37-12]: Schulman's unbiased, never negative
            # (r - 1) - log r, and the older naive -log r, logged as old_approx_kl
            "approx_kl": ((ratio - 1.0) - logratio).mean(),
            "old_approx_kl": (-logratio).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_coef).float().mean(),
        }
    return loss, parts


# 6. One iteration: collect a rollout, turn it into a batch, update the agent on it ---------------
class Rollout(NamedTuple):
    """One rollout: numpy arrays (T, N, ...), refilled each iteration (a row per step is cheaper
    to write in numpy than in torch)."""
    obs: np.ndarray           # s_t, what the agent acted on
    actions: np.ndarray       # a_t
    rewards: np.ndarray       # r_t, received after a_t
    next_obs: np.ndarray      # the true s_t+1: an ended episode's final observation, not the reset one
    terminations: np.ndarray  # 1 if s_t+1 is terminal (the episode ended in the env's own terms)
    truncations: np.ndarray   # 1 if a time limit cut the episode at s_t+1, which is not terminal


def new_rollout(num_steps: int, num_envs: int, obs_dim: int, action_shape: tuple, action_dtype) -> Rollout:
    zeros = lambda *shape, dtype=np.float32: np.zeros((num_steps, num_envs, *shape), dtype=dtype)  # noqa: E731
    return Rollout(obs=zeros(obs_dim), actions=zeros(*action_shape, dtype=action_dtype), rewards=zeros(),
                   next_obs=zeros(obs_dim), terminations=zeros(), truncations=zeros())


class Episode(NamedTuple):
    global_step: int  # when it ended
    episode_return: float  # undiscounted sum of its rewards
    length: int


def collect_rollout(*, envs, agent: nn.Module, obs: np.ndarray, rollout: Rollout,
                    global_step: int) -> tuple[np.ndarray, list[Episode]]:
    """Phase 1: act with the current policy for T steps in each of the N envs, filling `rollout`,
    from obs (N, obs_dim). Returns (the observations to act on next, the episodes that ended)."""
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
            # Gymnasium 1.x vector envs return infos as a dict of arrays over the envs, each key
            # with a boolean mask "_key" that says which envs it holds a value for.
            if "final_obs" in infos:
                # SAME_STEP autoreset: `obs` already starts the next episode in the envs that just
                # ended one; their true s_t+1 is in final_obs (needed to bootstrap a truncation),
                # and RecordEpisodeStatistics put the return and length in final_info["episode"].
                ended = np.flatnonzero(infos["_final_obs"])
                rollout.next_obs[step, ended] = np.stack(infos["final_obs"][ended])
                stats = infos["final_info"]["episode"]
                for i in np.flatnonzero(infos["final_info"]["_episode"]):
                    episodes.append(Episode(global_step + (step + 1) * num_envs, float(stats["r"][i]),
                                            int(stats["l"][i])))
    return obs, episodes


class Batch(NamedTuple):
    """A rollout flattened to T*N transitions, with what the loss needs; each field (T*N, ...)."""
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor       # log pi_old(a_t|s_t), under the policy that acted
    advantages: torch.Tensor     # GAE
    value_targets: torch.Tensor  # advantages + values: what the critic learns to predict
    values: torch.Tensor         # V_old(s_t), for value clipping and the explained variance


def make_batch(*, agent: nn.Module, rollout: Rollout, rewards: np.ndarray, gamma: float,
               gae_lambda: float) -> Batch:
    """Phase 2: old log-probs and values, GAE, and flattening. `rewards` (T, N): rollout.rewards
    or a scaled copy. The policy did not change during the rollout, so one batched pass here gives
    the old log-probs and values of all T*N steps, instead of T small ones while acting."""
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
    """One minibatch: the loss, its gradient, clipped to a global norm of max_grad_norm [37-11],
    then the optimizer's step. Returns ppo_loss's parts. The one step to edit."""
    newlogprob, entropy, newvalue = agent.logprob_entropy_value(mb.obs, mb.actions)
    advantages = mb.advantages
    if args.norm_adv:  # per minibatch [37-7]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=advantages,
                           newvalue=newvalue, oldvalue=mb.values, value_targets=mb.value_targets, entropy=entropy,
                           clip_coef=args.clip_coef, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
                           clip_vloss=args.clip_vloss)
    optimizer.zero_grad()
    loss.backward()
    # foreach, and Adam's fused=True: one kernel for all parameters, not a loop (benchmark/RESULTS.md)
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
    optimizer.step()
    return parts


def update(*, agent: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, args: Args,
           step_fn=gradient_step) -> dict[str, float]:
    """Phase 3: update_epochs passes over the batch in shuffled minibatches, a step_fn (gradient_step,
    or a faster equivalent) each. Returns ppo_loss's parts, averaged over this iteration's steps."""
    parts_per_step = []
    for epoch in range(args.update_epochs):
        # A new order each epoch: every transition lands in exactly one minibatch.
        perm = torch.randperm(args.batch_size, device=batch.obs.device)
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
    """Returns of n_episodes episodes of the deterministic policy. Env i of min(n_episodes,
    max_envs) is seeded seed + i and plays a fixed share (the first n to end would favour short ones)."""
    n_envs = min(n_episodes, max_envs)
    quota = np.array([n_episodes // n_envs + (i < n_episodes % n_envs) for i in range(n_envs)])
    envs = make_vector_env([make_env(env_id, video_dir if i == 0 else None,
                                     lambda ep: ep < quota[0]) for i in range(n_envs)])
    eval_returns: list[list[float]] = [[] for _ in range(n_envs)]
    obs, _ = envs.reset(seed=seed)
    while any(len(r) < q for r, q in zip(eval_returns, quota)):
        action = agent.deterministic_action(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "final_info" in infos:
            for i in np.flatnonzero(infos["final_info"]["_episode"]):
                if len(eval_returns[i]) < quota[i]:
                    eval_returns[i].append(float(infos["final_info"]["episode"]["r"][i]))
    envs.close()
    return np.array([r for per_env in eval_returns for r in per_env])


def make_agent_and_optimizer(args: Args) -> tuple[Agent, torch.optim.Optimizer]:
    random.seed(args.seed)  # before the weights are drawn
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    agent = Agent(*env_shapes(args.env_id), args.hidden_size)
    agent.to(torch.device("cuda" if args.cuda else "cpu"))
    return agent, torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # eps: [37-3]


def train(args: Args, agent: Agent, optimizer: torch.optim.Optimizer, envs=None, global_step: int = 0,
          step_fn=None, after_iteration=None) -> int:
    """PPO (the paper's Algorithm 1) from global_step (0, or a resumed run's) for the whole batches
    that fit in total_timesteps; returns the step reached. envs: by default num_envs of env_id.
    after_iteration(global_step=, episodes=, losses=, batch=, learning_rate=) runs after each
    iteration, True stops: the harness's logging, progress, evaluations, checkpoints, Ctrl-C.
    """
    envs = envs or make_vector_env([make_env(args.env_id) for _ in range(args.num_envs)])
    last_step = global_step + (args.total_timesteps - global_step) // args.batch_size * args.batch_size
    # Env i starts from seed + i; a resumed run starts its new episodes from fresh seeds.
    obs, _ = envs.reset(seed=args.seed + global_step // args.num_steps)
    rollout = new_rollout(args.num_steps, args.num_envs, envs.single_observation_space.shape[0], (), np.int64)
    while global_step < last_step:
        # Linear annealing [37-4], down to learning_rate * batch_size / last_step in the last iteration
        lr = args.learning_rate * (1.0 - global_step / last_step if args.anneal_lr else 1.0)
        optimizer.param_groups[0]["lr"] = lr
        obs, episodes = collect_rollout(envs=envs, agent=agent, obs=obs, rollout=rollout, global_step=global_step)
        batch = make_batch(agent=agent, rollout=rollout, rewards=rollout.rewards, gamma=args.gamma,
                           gae_lambda=args.gae_lambda)
        losses = update(agent=agent, optimizer=optimizer, batch=batch, args=args, step_fn=step_fn or gradient_step)
        global_step += args.batch_size
        if after_iteration is not None and after_iteration(global_step=global_step, episodes=episodes,
                                                           losses=losses, batch=batch, learning_rate=lr):
            break
    envs.close()
    return global_step


# 8. The harness ---------------------------------------------------------------------------------
# Run-control flags, progress lines, evaluations, checkpoint files, signals, resume, the compiled
# gradient step, the command line. Nothing below changes what is learned: a reader learning PPO
# can stop here.

# Flags that --resume and --eval-checkpoint always take from the command line, never from the
# checkpoint: where to run and what to do. Every other flag comes from the checkpoint unless given.
FROM_COMMAND_LINE = {"cuda", "resume", "eval_checkpoint", "render", "export"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunError(Exception):
    """Something the user can fix or must know, as one line: main() prints it and exits."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Diverged(Exception):
    """A non-finite loss or weight: training cannot go on."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class RunArgs(Args):
    """Every flag: the algorithm's (Args), then these, which never change what is learned."""

    exp_name: str = SCRIPT  # name of the experiment: part of the run directory's name
    runs_dir: str = "runs"  # folder that holds one sub-folder per run (TensorBoard logs, checkpoints, videos)
    capture_video: bool = False  # record mp4 videos of env 0 during training and of the evaluation episodes
    # On by default for long runs: a compiled gradient step costs about a quarter of an eager one
    # on a CPU, and compiling (about 16 s from nothing, once per process) pays back after about
    # 20,000 gradient steps (benchmark/RESULTS.md). Shorter runs train eagerly unless it is given.
    compile: bool = True  # compile the gradient step in runs of 20,000+ gradient steps, or whenever given (needs g++)
    eval_episodes: int = 100  # episodes of the deterministic evaluation at the end (and of --eval-checkpoint)
    eval_every: int = 0  # evaluate every N iterations during training, keep the best policy as best.pt (0: off)
    periodic_eval_episodes: int = 20  # episodes of each periodic evaluation (--eval-every)
    checkpoint_every: int = 50  # write checkpoint.pt every N iterations (it is also written at the end and on Ctrl-C)
    checkpoint_seconds: float = 60.0  # also write checkpoint.pt this many seconds after the last (0: off): a kill -9 loses less
    print_every: float = 5.0  # seconds between progress lines
    target_return: Optional[float] = None  # stop once a periodic evaluation's mean reaches this (evaluates every 1/40 of the run if --eval-every is 0)
    resume: Optional[str] = None  # checkpoint.pt of a run to continue in its own run directory
    eval_checkpoint: Optional[str] = None  # evaluate this checkpoint with the deterministic policy, and do not train
    render: bool = False  # with --eval-checkpoint: play the policy in a window instead (5 episodes unless --eval-episodes)
    export: Optional[str] = None  # with --eval-checkpoint: write the deterministic policy to this ONNX file, checked

    def check(self) -> Optional[str]:
        """The first thing wrong with the flags, as one line saying what to do, or None."""
        if error := super().check():
            return error
        for name in ("eval_episodes", "periodic_eval_episodes", "checkpoint_every"):
            if getattr(self, name) <= 0:
                return f"{flag(name)} must be positive, got {getattr(self, name)}"
        for name in ("eval_every", "checkpoint_seconds", "print_every"):
            if getattr(self, name) < 0:
                return f"{flag(name)} must be 0 or more, got {getattr(self, name)}"
        if not PLAIN_NAME.fullmatch(self.exp_name):
            return (f"--exp-name must be a plain name (letters, digits, '.', '_', '-'; not starting with "
                    f"'.' or '-'), got {self.exp_name!r}")
        if self.resume and self.eval_checkpoint:
            return "give --resume or --eval-checkpoint, not both"
        if (self.render or self.export) and not self.eval_checkpoint:
            return f"--{'render' if self.render else 'export'} works on a trained policy: add --eval-checkpoint PATH"
        if self.render and self.export:
            return "give --render or --export, not both"
        if self.cuda and not torch.cuda.is_available():
            return "--cuda was given but torch sees no CUDA device: drop --cuda"
        return None


class Progress(NamedTuple):
    global_step: int = 0
    iteration: int = 0
    best_eval: float = -math.inf  # best mean of the periodic evaluations so far
    target_reached: Optional[tuple[int, float]] = None  # (step, seconds of training) of --target-return


def final_step(args: Args, global_step: int = 0) -> int:
    """Where a run that is at global_step ends: the last whole batch within total_timesteps."""
    return global_step + (args.total_timesteps - global_step) // args.batch_size * args.batch_size


def eval_seed(args: Args) -> int:
    return args.seed + 1_000_000  # far from the training envs' seeds (seed + i)


def capped_cubic(episode_id: int) -> bool:
    """Which training episodes to film: 0, 1, 8, 27, ..., 729, then every 1000th (CleanRL's)."""
    return round(episode_id ** (1 / 3)) ** 3 == episode_id if episode_id < 1000 else episode_id % 1000 == 0


def make_training_envs(args: RunArgs, run_dir: str, global_step: int) -> gym.vector.SyncVectorEnv:
    # A resumed run records into its own folder: the episode numbers start again from 0.
    video_name = "train" if global_step == 0 else f"train_from_step_{global_step}"
    video_dir = os.path.join(run_dir, "videos", video_name) if args.capture_video else None
    return make_vector_env(
        [make_env(args.env_id, video_dir if i == 0 else None, capped_cubic) for i in range(args.num_envs)])


def make_writer(args: RunArgs, run_dir: str, global_step: int):
    """A TensorBoard writer for run_dir; on resume it drops what an interrupted run logged after
    its checkpoint (steps > global_step)."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow to import

    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if global_step else None)
    if global_step == 0:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def check_env(env_id: str) -> Optional[str]:
    """Whether env_id can be trained by this script: None, or a one-line error."""
    try:
        env = gym.make(env_id)
    except Exception as e:  # unknown id, a missing package (box2d, jax, ...), bad version, a bug in the env
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot make env {env_id!r} ({reason}): pick an id from gymnasium.envs.registry"
    try:
        obs_space, space = env.observation_space, env.action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            return f"{env_id} observations are not a flat Box (got {obs_space}): neither script takes them"
        if isinstance(space, gym.spaces.Box):
            return f"{env_id} has a continuous (Box) action space: use ppo_continuous.py"
        if not isinstance(space, gym.spaces.Discrete):
            return f"{env_id} has a {type(space).__name__} action space: this script needs Discrete"
        if space.start != 0:
            return f"{env_id} numbers its actions from {space.start}: this script needs actions 0 to n - 1"
    finally:
        env.close()
    return None


def available_memory() -> Optional[int]:
    """Bytes of memory available now (Linux's MemAvailable, else all physical memory), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None


def check_memory(args: Args, obs_dim: int, action_size: int) -> Optional[str]:
    """A rough upper estimate of what training holds at once, against the memory available."""
    params = 2 * (obs_dim * args.hidden_size + args.hidden_size ** 2) + args.hidden_size * (action_size + 1)
    network = params * 4 * 4  # weights, gradients and Adam's two moments, float32
    # Per transition: the rollout (obs and next obs, in numpy and as a shuffled copy), the other
    # fields, and the hidden activations of the batched passes that build the batch.
    per_step = 4 * (4 * obs_dim + 3 * action_size + 16) + 4 * 6 * args.hidden_size
    # Each env of the vector env, with its wrappers: BipedalWalker-v3, the heaviest of
    # benchmark/envs.py, held 376 KiB per env in 1,000 (LunarLander-v3 111 KiB, the classic-control
    # envs 5-7 KiB; resident memory, 2026-12-01).
    per_env = 400 * 1024
    need, available = network + per_step * args.batch_size + per_env * args.num_envs, available_memory()
    if available is not None and need > 0.8 * available:
        return (f"{args.num_envs:,} envs, a batch of {args.batch_size:,} steps and hidden layers of {args.hidden_size} "
                f"need about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: lower "
                "--num-envs, --num-steps or --hidden-size")
    return None


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def get_rng_state() -> dict:
    # Plain tensors, lists and numbers only, so that torch.load(weights_only=True) accepts it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What a checkpoint holds: the entries each mode needs, checked when it is read.
ACTION_SIZE = "n_actions"  # the checkpoint entry that holds the size of the action space
EVAL_ENTRIES = {"args": dict, "obs_dim": int, ACTION_SIZE: int, "model": dict, "global_step": int}
RESUME_ENTRIES = {**EVAL_ENTRIES, "optimizer": dict, "rng": dict, "iteration": int, "best_eval": float,
                  "resumable": bool}

TEMP_FILES: set[str] = set()  # written right now; a second Ctrl-C removes them before it exits
# The temp files write_atomically makes in a run directory (mkstemp adds 8 characters): a kill -9
# during a write leaves one, which the next --resume of the run removes.
STALE_TEMP_FILE = re.compile(r"(checkpoint\.pt|best\.pt|evaluation\.json)\.[A-Za-z0-9_]{8}\.tmp")


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Remove the temp files a killed process left in run_dir (call it holding the run's lock)."""
    removed = []
    for name in os.listdir(run_dir):
        if STALE_TEMP_FILE.fullmatch(name):
            try:
                os.remove(os.path.join(run_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def write_atomically(path: str, write) -> None:
    """write(file) into a new temp file beside path, flushed to disk, then renamed over path.

    The temp file is created exclusively under a fresh name and the rename replaces a symlink
    rather than following it, so nothing is ever written through a link planted in the run
    directory. If anything fails, path is untouched and the temp file removed."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    TEMP_FILES.add(tmp)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 600 would hide the run from its group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        TEMP_FILES.discard(tmp)
        if os.path.lexists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, *, agent, optimizer, args: Args, progress: Progress, resumable: bool,
                    state: Optional[dict] = None) -> None:
    """resumable: the run's latest state (checkpoint.pt), not a snapshot to evaluate (best.pt);
    state: training_state()'s modules."""
    data = {**{name: module.state_dict() for name, module in (state or {}).items()}, "script": SCRIPT, "format": CHECKPOINT_FORMAT, "args": asdict(args), "resumable": resumable,
            "obs_dim": agent.actor[0].in_features, ACTION_SIZE: agent.actor[-1].out_features, "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(), "global_step": progress.global_step,
            "iteration": progress.iteration, "best_eval": float(progress.best_eval), "rng": get_rng_state(),
            "target_reached": list(progress.target_reached) if progress.target_reached else None}
    # Serialized in memory first: on a full disk torch.save's zip writer raises RuntimeError (or
    # worse), while a plain write raises the OSError that says what happened.
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_atomically(path, lambda f: f.write(buffer.getbuffer()))


class CheckpointError(Exception):
    pass


def fits(value, kind) -> bool:
    """Whether a value read from a file has the type an Args field (or a checkpoint entry) wants."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        return any(fits(value, k) for k in typing.get_args(kind))
    return isinstance(value, kind)




def tensors_in(value) -> list[torch.Tensor]:
    """The tensors held in a nest of dicts, lists and tuples (an optimizer's state)."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in tensors_in(item)]


def load_checkpoint(path: str, entries: dict = EVAL_ENTRIES) -> dict:
    """Load and check a checkpoint of this script; CheckpointError says what is wrong."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory: give the checkpoint file in it (checkpoint.pt or best.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: give the path of a checkpoint.pt or best.pt")
    try:  # torch.save writes a zip of stored entries: what it inflates to is known before loading
        with zipfile.ZipFile(path) as archive:
            sizes = [(info.file_size, info.compress_size) for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              "it may be truncated or another kind of file; pick another") from None
    available = available_memory()
    if any(size > stored for size, stored in sizes):
        raise CheckpointError(f"{path} declares entries larger than it stores (compressed, which torch.save never "
                              f"does): it is not a checkpoint of {SCRIPT}.py, and may be built to inflate; pick another")
    if available is not None and sum(size for size, _ in sizes) > 0.5 * available:
        raise CheckpointError(f"{path} would take {sum(size for size, _ in sizes) / 2**30:.1f} GiB to load, more than "
                              f"half of the {available / 2**30:.1f} GiB available: pick another checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds more than tensors
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              "it may be truncated or another kind of file; pick another") from None
    if not isinstance(data, dict) or data.get("script") != SCRIPT:
        other = data.get("script") if isinstance(data, dict) else None
        hint = f" (it comes from {other}.py: use that script)" if isinstance(other, str) else ""
        raise CheckpointError(f"{path} is not a checkpoint of {SCRIPT}.py{hint}")
    if data.get("format") == 1:  # before format 2, only the file name told whether it was resumable
        data["resumable"] = os.path.basename(path) != "best.pt"
    elif data.get("format") not in (2, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')}, "
                              f"this script reads {CHECKPOINT_FORMAT}, 2 and 1")
    if data["format"] < 3 and isinstance(data.get("model"), dict):  # the reward scaler's statistics moved
        data["reward_scaler"] = {k: data["model"].pop(k) for k in list(data["model"]) if k.startswith("return_rms.")}
    wrong = [k for k, kind in entries.items() if not fits(data.get(k), kind)]
    wrong += [f"args.{f.name}" for f in fields(RunArgs) if "args" not in wrong and f.name in data["args"]
              and not fits(data["args"][f.name], f.type)]
    if "model" not in wrong and not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point()
                                        for k, v in data["model"].items()):
        wrong.append("model")
    # Training never saves after a non-finite weight (Diverged): NaN or inf in a file is damage.
    wrong += [f"{k} (non-finite numbers)" for k, v in data.items() if k not in wrong
              and not all(torch.isfinite(t).all() for t in tensors_in(v))]
    wrong += [k for k in ("global_step", "iteration") if k in entries and k not in wrong and data[k] < 0]
    wrong += [k for k in ("obs_dim", ACTION_SIZE) if k not in wrong and data[k] < 1]
    if "best_eval" in entries and "best_eval" not in wrong and math.isnan(data["best_eval"]):
        wrong.append("best_eval")
    reached = data.get("target_reached")  # (step, seconds) where --target-return was reached, or None
    if reached is not None and not (isinstance(reached, list) and len(reached) == 2 and fits(reached[0], int)
                                    and fits(reached[1], float)):
        wrong.append("target_reached")
    if wrong:
        raise CheckpointError(f"{path} lacks, or has damaged, {', '.join(wrong)}: it was not written whole "
                              f"by {SCRIPT}.py; pick another checkpoint")
    return data


def agent_from_checkpoint(data: dict, device="cpu") -> Agent:
    """The policy a checkpoint holds."""
    agent = Agent(data["obs_dim"], data["n_actions"], data["args"]["hidden_size"])
    try:
        agent.load_state_dict(data["model"])
    except RuntimeError:  # missing, unexpected or wrongly shaped tensors
        raise CheckpointError("the checkpoint's weights do not fit the network its own flags describe: "
                              "the file is damaged; pick another checkpoint") from None
    return agent.to(device)


def restore(agent, optimizer, state: dict, data: dict) -> None:
    """Load the weights, optimizer state, training_state() and RNG states of a resumable checkpoint."""
    agent.load_state_dict(data["model"])
    try:
        optimizer.load_state_dict(data["optimizer"])
        for param, moments in optimizer.state.items():  # load_state_dict takes moments of any shape
            if any(isinstance(t, torch.Tensor) and k != "step" and t.shape != param.shape for k, t in moments.items()):
                raise ValueError("optimizer state of the wrong shape")
        for name, module in state.items():
            module.load_state_dict(data[name])
        set_rng_state(data["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
        raise CheckpointError("the checkpoint's optimizer or RNG state is damaged: it cannot be resumed; "
                              "evaluate it with --eval-checkpoint, or start a new run") from None


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the Args fields given on the command line (--flag, --flag=x, --no-flag)."""
    names = {f.name for f in fields(RunArgs)}
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=")[0].replace("-", "_")
            given.add(name[3:] if name.startswith("no_") and name[3:] in names else name)
    return given


def args_from_checkpoint(data: dict, cli: RunArgs, given: set[str]) -> RunArgs:
    """The checkpoint's flags, overridden by the ones given explicitly on this command line."""
    known = {f.name for f in fields(RunArgs)}
    merged = {k: v for k, v in data["args"].items() if k in known}
    merged.update({k: getattr(cli, k) for k in given | FROM_COMMAND_LINE if k in known})
    env_id = merged.get("env_id", cli.env_id)
    # gym.make("module:Env") imports that module: a file from elsewhere must not choose code to run.
    if "env_id" not in given and env_id not in gym.registry:
        raise CheckpointError(f"the checkpoint names env {env_id!r}, which is not a registered Gymnasium id: "
                              f"pass --env-id {env_id} yourself if you trust the file")
    return RunArgs(**merged)


def check_shapes(data: dict, args: Args, given: set[str]) -> Optional[str]:
    obs_dim, n_actions = env_shapes(args.env_id)
    if (data["obs_dim"], data["n_actions"]) != (obs_dim, n_actions):
        return (f"the checkpoint was trained for {data['obs_dim']} observations and {data['n_actions']} "
                f"actions, but {args.env_id} has {obs_dim} and {n_actions}: use the env it was trained on")
    weight = data["model"].get("actor.0.weight")
    if weight is None or weight.dim() != 2:  # a scalar where the first layer's weights belong
        return ("the checkpoint's weights do not fit the network its own flags describe: the file is damaged; "
                "pick another checkpoint")
    hidden = weight.shape[0]
    if hidden != args.hidden_size:
        if "hidden_size" in given:
            return f"the checkpoint has hidden layers of {hidden}, not {args.hidden_size}: drop --hidden-size"
        return (f"the checkpoint's weights have hidden layers of {hidden} but its flags say {args.hidden_size}: "
                "the file is damaged; pick another checkpoint")
    return None


def evaluated(run_dir: str, global_step: int) -> bool:
    """Whether run_dir's evaluation.json holds the final evaluation of step global_step."""
    try:
        with open(os.path.join(run_dir, "evaluation.json")) as f:
            return json.load(f).get("global_step") == global_step
    except (OSError, ValueError, AttributeError):
        return False


def check_resume(data: dict, args: Args, path: str, start: Progress) -> Optional[str]:
    """Whether the checkpoint can continue: it is a run's latest state, with steps left to train
    (or, if the run is trained, its final evaluation left to run)."""
    if not data["resumable"]:
        return (f"{path} is a snapshot (best.pt or a copy of one), not a run's latest state: resuming it "
                "would rewind the run. Resume its checkpoint.pt, or evaluate it with --eval-checkpoint")
    old = data["args"]
    step, old_batch = data["global_step"], old.get("num_envs", args.num_envs) * old.get("num_steps", args.num_steps)
    if args.batch_size != old_batch and (args.total_timesteps - step) % args.batch_size:
        k = max(1, -(-(args.total_timesteps - step) // args.batch_size))  # rounded up
        return (f"the checkpoint is at step {step:,}; batches of {args.batch_size:,} cannot end exactly at "
                f"--total-timesteps {args.total_timesteps:,}: give a multiple of the batch beyond it, e.g. "
                f"--total-timesteps {step + k * args.batch_size}")
    if final_step(args, step) <= step and evaluated(os.path.dirname(os.path.abspath(path)), step):
        return (f"this run is finished: it trained to step {step:,} of --total-timesteps "
                f"{args.total_timesteps:,}. Raise --total-timesteps to train on, or evaluate it with --eval-checkpoint")
    if start.target_reached and evaluated(os.path.dirname(os.path.abspath(path)), step):
        return (f"this run is finished: a periodic evaluation reached --target-return {args.target_return} at step "
                f"{start.target_reached[0]:,}. Give a higher --target-return to train on, or evaluate it with "
                "--eval-checkpoint")
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return f"cannot write to the run directory of {path}: make it writable, or copy the run elsewhere"
    return None


def training_state(args: RunArgs) -> dict:
    """What training keeps besides the agent and the optimizer, by checkpoint entry: nothing here."""
    return {}


def new_run_dir(args: RunArgs) -> str:
    env_name = re.sub(r"[^A-Za-z0-9._-]", "-", args.env_id)  # "ALE/Pong-v5" must not make a subfolder
    name = f"{env_name}__{args.exp_name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    parent = os.path.abspath(args.runs_dir)
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)  # the nearest folder that exists: its file system sets the limit
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):
        name_max = 255
    if len(os.fsencode(name)) > name_max:  # checked before any folder is made
        raise OSError(errno.ENAMETOOLONG, f"its name would take {len(os.fsencode(name))} bytes, more than the "
                      f"{name_max} a file name may have there")
    os.makedirs(args.runs_dir, exist_ok=True)
    for n in range(1, 100):  # another run of the same flags started in the same second: a new name, never its folder
        run_dir = os.path.join(args.runs_dir, name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"99 runs named {name} exist")


def lock_run_dir(run_dir: str):
    """Hold run_dir/run.lock for the life of this process, or RunError if another process holds
    it: two processes training one run at once would interleave its checkpoints. The lock goes
    with the process, kill -9 included. Keep the returned file open; None where there is no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        lock = open(os.path.join(run_dir, "run.lock"), "a+")
    except OSError as e:
        raise RunError(f"cannot write in {run_dir} ({e.strerror or e}): make it writable", code=1) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        raise RunError(f"another process{f' (pid {pid})' if pid.isdigit() else ''} is training {run_dir} right now: "
                       "let it finish or stop it, then resume") from None
    try:  # the holder's pid, for the message above: nice to have, so a full disk does not stop the run here
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
    except OSError:
        pass
    return lock


def check_compile_cache() -> Optional[str]:
    """torch creates Inductor's cache folder the first time the optimizer imports torch._dynamo,
    compiling or not: a TORCHINDUCTOR_CACHE_DIR it cannot create would be a traceback there."""
    try:
        import torch._dynamo  # noqa: F401
    except OSError as e:
        where = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "its default cache folder"
        return (f"torch cannot create its compile cache folder {where} ({e.strerror or e}), which it needs even "
                "with --no-compile: point TORCHINDUCTOR_CACHE_DIR to a folder you can write")
    return None


def os_error_reason(e: OSError) -> str:
    """What went wrong, in a few words: the error's strerror, or the cause named in a long message
    (moviepy's video writer wraps ffmpeg's whole output in one OSError)."""
    if e.strerror:
        return e.strerror
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(code) in text:
            return os.strerror(code)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def quiet_thread_errors(hook) -> None:
    """A threading.excepthook that drops OSError (TensorBoard's writer thread on a full disk: the
    main thread gets the same error at its next write and says it in one line) and passes the rest on."""
    if not issubclass(hook.exc_type, OSError):
        threading.__excepthook__(hook)


LOSS_TAGS = {"pg_loss": "losses/policy_loss", "v_loss": "losses/value_loss", "entropy_loss": "losses/entropy",
             "approx_kl": "losses/approx_kl", "old_approx_kl": "losses/old_approx_kl", "clipfrac": "losses/clipfrac"}


def log_iteration(writer, *, global_step: int, episodes: list[Episode], sps: float, losses: dict[str, float],
                  batch: Batch, learning_rate: float) -> None:
    """TensorBoard scalars under CleanRL's tags. The x axis counts env steps, so runs of other
    batch sizes compare on one axis."""
    for episode in episodes:
        writer.add_scalar("charts/episodic_return", episode.episode_return, episode.global_step)
        writer.add_scalar("charts/episodic_length", episode.length, episode.global_step)
    writer.add_scalar("charts/learning_rate", learning_rate, global_step)
    writer.add_scalar("charts/SPS", sps, global_step)
    for name, value in losses.items():
        writer.add_scalar(LOSS_TAGS[name], value, global_step)
    # 1 - Var(targets - values) / Var(targets): 1 is a perfect critic, 0 no better than a constant
    residual, targets = (batch.value_targets - batch.values).var(), batch.value_targets.var()
    writer.add_scalar("losses/explained_variance", (1 - residual / targets).item() if targets > 0 else math.nan,
                      global_step)


class Harness:
    """Run control for a run from the command line, in train()'s after_iteration hook: progress
    lines, periodic evaluations and best.pt, --target-return, checkpoint files, the divergence
    check, and a stop after the current iteration on Ctrl-C, SIGTERM or SIGHUP (the signal
    handler is this object)."""

    def __init__(self, args: RunArgs, run_dir: str, agent: Agent, optimizer: torch.optim.Optimizer, start: Progress,
                 writer=None, compiling: bool = False, state: Optional[dict] = None):
        self.args, self.run_dir, self.agent, self.optimizer, self.writer = args, run_dir, agent, optimizer, writer
        self.compiling, self.state = compiling, state or {}
        self.signum, self.total, self.progress = 0, final_step(args, start.global_step), start
        self.start_step, self.recent_returns = start.global_step, deque(maxlen=20)
        self.start_time = self.last_save = time.perf_counter()
        self.last_print, self.last_print_step = -math.inf, start.global_step
        self.saved_step = start.global_step if start.global_step else None

    def __call__(self, signum, frame):
        if self.signum:  # a second Ctrl-C: leave at once, without a new checkpoint
            for tmp in list(TEMP_FILES):  # a checkpoint being written: the old one stays intact
                try:
                    os.remove(tmp)
                except OSError:
                    pass
            print("\nsecond interrupt: exiting without a new checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this iteration, then stopping "
              "(press Ctrl-C again to quit at once)", file=sys.stderr)

    def after_iteration(self, *, global_step: int, episodes: list, losses: dict[str, float], batch: Batch,
                        learning_rate: float) -> bool:
        """train()'s hook: True stops training. Raises Diverged before anything of a non-finite
        iteration is saved."""
        if not all(math.isfinite(v) for v in losses.values()):
            raise Diverged("a non-finite loss")
        if not all(torch.isfinite(p).all() for p in self.agent.parameters()):
            raise Diverged("a non-finite weight")
        args, (_, iteration, best_eval, target_reached) = self.args, self.progress
        iteration, seconds = iteration + 1, time.perf_counter() - self.start_time
        sps = (global_step - self.start_step) / seconds
        log_iteration(self.writer, global_step=global_step, episodes=episodes, sps=sps, losses=losses, batch=batch,
                      learning_rate=learning_rate)
        self.recent_returns.extend(episode.episode_return for episode in episodes)
        self.report(global_step, sps)
        if args.eval_every and iteration % args.eval_every == 0:
            eval_returns = evaluate(self.agent, args.env_id, args.periodic_eval_episodes, eval_seed(args),
                                    next(self.agent.parameters()).device)
            self.writer.add_scalar("eval/mean_return", eval_returns.mean(), global_step)
            print(f"eval at step {global_step:,}: {eval_returns.mean():.1f} +/- {eval_returns.std():.1f} "
                  f"over {len(eval_returns)} episodes", flush=True)
            if eval_returns.mean() > best_eval:
                best_eval = float(eval_returns.mean())
                self.save("best.pt", Progress(global_step, iteration, best_eval))
            if args.target_return is not None and eval_returns.mean() >= args.target_return:
                target_reached = (global_step, seconds)
                self.writer.add_scalar("eval/target_reached_seconds", seconds, global_step)
        self.progress = Progress(global_step, iteration, best_eval, target_reached)
        if (iteration % args.checkpoint_every == 0 or global_step == self.total or target_reached or self.signum
                or 0 < args.checkpoint_seconds <= time.perf_counter() - self.last_save):
            self.save("checkpoint.pt", self.progress)
            self.last_save = time.perf_counter()
        return bool(self.signum or target_reached)  # the learning-rate schedule was not shortened

    def save(self, name: str, progress: Progress) -> None:
        path = os.path.join(self.run_dir, name)
        try:
            save_checkpoint(path, agent=self.agent, optimizer=self.optimizer, args=self.args, progress=progress,
                            resumable=name == "checkpoint.pt", state=self.state)
        except OSError as e:
            raise RunError(f"cannot write {path} ({os_error_reason(e)}) at step {progress.global_step:,}: training "
                           f"stopped; {self.last_checkpoint()}", code=1) from None
        if name == "checkpoint.pt":
            self.saved_step = progress.global_step

    def last_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written before it"
        return f"{os.path.join(self.run_dir, 'checkpoint.pt')} (step {self.saved_step:,}) is intact"

    def report(self, step: int, sps: float) -> None:
        now, total, first = time.perf_counter(), self.total, self.last_print == -math.inf
        if not (first or step >= total or now - self.last_print >= self.args.print_every):
            return
        # The ETA goes by the speed since the previous line: the first iteration of a compiled run
        # holds the compiling, and would overstate the time left for the rest of the run.
        rate = sps if first else (step - self.last_print_step) / max(now - self.last_print, 1e-9)
        self.last_print, self.last_print_step = now, step
        eta = "after compiling" if first and self.compiling else format_seconds((total - step) / max(rate, 1e-9))
        mean_return = f"{np.mean(self.recent_returns):8.1f}" if self.recent_returns else "     n/a"
        print(f"step {step:>10,}/{total:,} ({100 * step / total:3.0f}%) | {sps:6,.0f} steps/s | "
              f"return {mean_return} (last 20 episodes) | ETA {eta}", flush=True)


def check_display() -> Optional[str]:
    chosen = os.environ.get("SDL_VIDEODRIVER", "")  # e.g. "dummy": no window, asked for
    if sys.platform.startswith("linux") and not chosen and not any(
            os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY")):
        return "--render needs a display and none is set (DISPLAY is empty): record videos with --capture-video instead"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:  # the envs draw with pygame; SDL falls back to an invisible "offscreen" window if the display is dead
        import pygame
    except ImportError:
        return None  # the env will say what it needs
    try:
        pygame.display.init()
        driver, reason = pygame.display.get_driver(), "no display server answers there"
    except pygame.error as e:
        driver, reason = None, str(e)
    finally:
        pygame.display.quit()
    if driver is None or (driver in ("offscreen", "dummy") and driver != chosen):
        where = ", ".join(f"{n}={os.environ[n]}" for n in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")
                          if os.environ.get(n))
        return (f"--render cannot open a window with {where or 'no display set'} ({reason}): start the display, "
                "fix DISPLAY, or record videos with --capture-video instead")
    return None


def watch(agent: nn.Module, env_id: str, n_episodes: int, seed: int, device="cpu") -> None:
    """Play the deterministic policy in a window, one env at its own frame rate, printing returns."""
    env = make_env(env_id, render_mode="human")()
    try:
        for episode in range(n_episodes):
            obs, _ = env.reset(seed=seed + episode)
            done = False
            while not done:
                with torch.no_grad():
                    action = agent.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32, device=device))
                obs, _, terminated, truncated, info = env.step(action[0].cpu().numpy())
                done = terminated or truncated
            print(f"episode {episode + 1}: return {float(info['episode']['r']):.1f}", flush=True)
    finally:
        env.close()


class ExportedPolicy(nn.Module):
    """The deterministic policy as one function of the observation, for ONNX: the agent's
    normalization (if any) is inside it, and Box actions are clipped to the env's bounds."""

    def __init__(self, agent: nn.Module, low: Optional[torch.Tensor], high: Optional[torch.Tensor]):
        super().__init__()
        self.agent, self.low, self.high = agent, low, high

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        action = self.agent.deterministic_action(obs)
        return action if self.low is None else torch.max(torch.min(action, self.high), self.low)


def export_onnx(agent: nn.Module, env_id: str, path: str, n_checks: int = 4096) -> str:
    """Write the deterministic policy as ONNX (input "obs": (B, obs_dim) float32, output "action"),
    then check that onnxruntime gives the agent's actions on n_checks random observations."""
    import logging

    import onnxruntime

    if os.path.isdir(path):
        raise RunError(f"--export {path} is a folder: give the path of the .onnx file to write")
    if os.path.isfile(path) and zipfile.is_zipfile(path):  # checkpoints are zips, ONNX files are not
        raise RunError(f"--export {path} is a checkpoint: exporting over it would destroy it; give another path")
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
        raise RunError(f"--export {path}: its folder is not writable; give a path in a folder you can write")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # no notes about optional torchvision ops
    env = gym.make(env_id)
    space, obs_space = env.action_space, env.observation_space
    env.close()
    bounded = isinstance(space, gym.spaces.Box)
    policy = ExportedPolicy(agent.cpu(), *((torch.as_tensor(space.low), torch.as_tensor(space.high))
                                           if bounded else (None, None))).eval()
    with warnings.catch_warnings():  # the exporter's own deprecation notes are not the user's concern
        warnings.simplefilter("ignore")
        program = torch.onnx.export(policy, (torch.zeros(2, obs_space.shape[0]),), dynamo=True, verbose=False,
                                    input_names=["obs"], output_names=["action"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    try:
        write_atomically(path, lambda f: f.write(program.model_proto.SerializeToString()))
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e}): nothing was exported", code=1) from None
    obs_space.seed(0)
    obs = np.stack([obs_space.sample() for _ in range(n_checks)]).astype(np.float32)
    got = onnxruntime.InferenceSession(path).run(None, {"obs": obs})[0]
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
    if bounded:
        same = np.isclose(got, expected, rtol=1e-4, atol=1e-4).all(-1)
    else:  # an argmax may flip only where two logits tie to float precision
        logits = torch.sort(agent.actor(torch.from_numpy(obs)), dim=-1, descending=True)[0].detach().numpy()
        same = (got == expected) | (logits[:, 0] - logits[:, 1] < 1e-5)
    if not same.all():
        raise RunError(f"the exported policy in {path} disagrees with the agent on {int((~same).sum())} of "
                       f"{n_checks} observations: do not use it", code=1)
    return (f"exported {path}: observations ({obs_space.shape[0]},) float32 in, actions out; the same actions "
            f"as the agent on {n_checks} random observations (onnxruntime)")


class QuietStream:
    """stdout or stderr that goes quiet instead of raising once its reader is gone (`| head`,
    a closed terminal): printing must never stop a run or lose its checkpoint."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            self.silence()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.silence()

    def silence(self) -> None:
        # Point the file descriptor at /dev/null, so the interpreter's last flush at exit fails silently too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass
        self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def report_evaluation(eval_returns: np.ndarray, path: Optional[str], global_step: int, **extra) -> None:
    print(f"evaluation: {eval_returns.mean():.1f} +/- {eval_returns.std():.1f} over {len(eval_returns)} "
          "episodes of the deterministic policy", flush=True)
    if path:
        finite = lambda x: float(x) if math.isfinite(x) else None  # noqa: E731  (JSON has no NaN)
        text = json.dumps({"global_step": global_step, "mean": finite(eval_returns.mean()),
                           "std": finite(eval_returns.std()), "returns": [finite(r) for r in eval_returns], **extra})
        write_atomically(path, lambda f: f.write(text.encode()))


# Below this many gradient steps a run trains eagerly unless --compile is given: compiling from
# nothing took about 16 s, and then saved about 0.8 ms per gradient step, so it pays back after
# about 20,000 (benchmark/RESULTS.md).
COMPILE_MIN_STEPS = 20_000
PROOF_EVERY = 1000  # the compiled step checks itself against gradient_step every this many steps


def gradient_steps(args: Args) -> int:
    return args.num_iterations * args.update_epochs * args.num_minibatches


def cpp_compiler_found() -> bool:
    return bool(os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")))


class CompiledGradientStep:
    """gradient_step's arithmetic as one compiled graph, about a quarter of its time on a CPU
    (benchmark/RESULTS.md); update(step_fn=...) calls it as it calls gradient_step.

    It proves itself before use and every PROOF_EVERY steps after: from the same state, on the
    same minibatch, it must change the weights and the optimizer state as gradient_step does (up
    to float rounding). If it does not (gradient_step or the optimizer was edited), or compiling
    fails, it says so once and steps aside for gradient_step. Called with another agent,
    optimizer or args, it is gradient_step. While it runs, p.grad stays None.

    On 64-row minibatches nearly all of an eager step is PyTorch's fixed cost per operation, some
    hundreds of them; torch.compile turns them into one call of generated C++. For one graph to
    hold the whole step, the gradients come from torch.autograd.grad instead of backward(), Adam
    runs as torch.optim's functional adam() on the optimizer's own state, and the learning rate
    is a tensor, so that annealing it does not recompile.
    """

    def __init__(self, agent: Agent, optimizer: torch.optim.Optimizer, args: Args):
        self.own, self.calls, self.eager = (agent, optimizer, args), 0, False
        self.params, group, self.optimizer_state = list(agent.parameters()), optimizer.param_groups[0], optimizer.state
        # Read once: a graph that read them from the optimizer would be guarded on its learning
        # rate too, and recompile at every iteration as the rate anneals.
        self.adam_options = dict(beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                                 eps=group["eps"])
        # cpp_wrapper: the kernels are called from C++ rather than Python; the same kernels and
        # results, about 10% less time per step (measured on a CPU only, so used there only).
        self.graph = torch.compile(self.fused_step, fullgraph=True, dynamic=False,
                                   options={"cpp_wrapper": self.params[0].device.type == "cpu"})

    def fused_step(self, mb: Batch, lr: torch.Tensor) -> dict:
        from torch.optim.adam import adam  # the arithmetic of torch.optim.Adam, as a function

        agent, _, args = self.own
        newlogprob, entropy, newvalue = agent.logprob_entropy_value(mb.obs, mb.actions)
        advantages = mb.advantages
        if args.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=advantages,
                               newvalue=newvalue, oldvalue=mb.values, value_targets=mb.value_targets, entropy=entropy,
                               clip_coef=args.clip_coef, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
                               clip_vloss=args.clip_vloss)
        grads = torch.autograd.grad(loss, self.params)
        # clip_grad_norm_'s arithmetic: one norm over all gradients, scaled down to max_grad_norm
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        grads = [g * (args.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0) for g in grads]
        state = [self.optimizer_state[p] for p in self.params]
        with torch.no_grad():
            adam(self.params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
                 [s["step"] for s in state], amsgrad=False, lr=lr, maximize=False, **self.adam_options)
        return parts

    def run_graph(self, mb: Batch) -> dict:
        import torch._dynamo

        with torch._dynamo.config.patch(trace_autograd_ops=True):  # lets the graph hold autograd.grad
            return self.graph(mb, torch.tensor(self.own[1].param_groups[0]["lr"], device=mb.obs.device))

    def tensors(self) -> list[torch.Tensor]:
        state = self.optimizer_state
        return self.params + [v for p in self.params for v in state[p].values() if isinstance(v, torch.Tensor)]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors(), saved):
                t.copy_(s)

    def __call__(self, *, agent: nn.Module, optimizer: torch.optim.Optimizer, mb: Batch, args: Args) -> dict:
        # Adam creates its state in its first step, so that one is always gradient_step's.
        if self.eager or any(a is not b for a, b in zip((agent, optimizer, args), self.own)) or not optimizer.state:
            return gradient_step(agent=agent, optimizer=optimizer, mb=mb, args=args)
        self.calls += 1
        if self.calls % PROOF_EVERY != 1:
            return self.run_graph(mb)
        before = [t.detach().clone() for t in self.tensors()]
        parts = gradient_step(agent=agent, optimizer=optimizer, mb=mb, args=args)
        expected = [t.detach().clone() for t in self.tensors()]
        self.restore(before)
        try:
            self.run_graph(mb)
            # What the step changed in all the weights together, not the weights themselves: an edit
            # such as AdamW's weight decay moves a weight by far less than its rounding tolerance. (Per
            # tensor, a one-number bias whose Adam moment nearly cancels is all rounding.)
            n = len(self.params)
            norm = lambda ts: torch.sqrt(sum((t.double() ** 2).sum() for t in ts))  # noqa: E731
            same = norm([g - e for g, e in zip(self.tensors()[:n], expected)]) <= 1e-2 * norm(
                [e - b for e, b in zip(expected[:n], before[:n])])
            reason = "it does not change the weights as gradient_step does (was it or the optimizer edited?)"
        except Exception as e:  # e.g. a broken C++ compiler
            same, reason = False, f"compiling it failed ({type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:200]})"
        optimizer.zero_grad(set_to_none=True)
        if not same:
            self.restore(expected)
            self.eager = True
            print(f"note: the compiled gradient step was not used: {reason}; training with gradient_step",
                  file=sys.stderr)
        return parts


def choose_gradient_step(args: RunArgs, agent: Agent, optimizer: torch.optim.Optimizer, forced: bool = False):
    """The one place that decides whether to compile: gradient_step itself, or CompiledGradientStep
    for a run long enough to pay for compiling (or forced, as by an explicit --compile)."""
    if not args.compile or not (forced or (not args.cuda and gradient_steps(args) >= COMPILE_MIN_STEPS)):
        return gradient_step
    if not cpp_compiler_found():
        print("note: compiling the gradient step needs a C++ compiler and none was found (g++, clang++ or "
              "$CXX): training without compiling (--no-compile: without this note)", file=sys.stderr)
        return gradient_step
    return CompiledGradientStep(agent, optimizer, args)


def prepare(cli: RunArgs, given: set[str]) -> tuple[RunArgs, Optional[dict]]:
    """The flags to run with and the checkpoint to start from, checked (run() checks a resume's
    optimizer state and steps left); else RunError or CheckpointError, before anything is written."""
    checkpoint, args = None, cli
    if cli.resume or cli.eval_checkpoint:
        checkpoint = load_checkpoint(cli.resume or cli.eval_checkpoint, RESUME_ENTRIES if cli.resume else EVAL_ENTRIES)
        args = args_from_checkpoint(checkpoint, cli, given)
    if (error := args.check()) or (error := check_env(args.env_id)):
        raise RunError(error)
    if not args.eval_checkpoint and (error := check_compile_cache()):
        raise RunError(error)
    if args.render and (error := check_display()):
        raise RunError(error)
    if args.export:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise RunError(f"--export needs {', '.join(missing)}: pip install -r benchmark/requirements.txt")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.export))):
            raise RunError(f"--export {args.export}: its folder does not exist")
    if args.target_return is not None and args.eval_every == 0:
        args = replace(args, eval_every=max(1, args.num_iterations // 40))
    if error := check_memory(args, *env_shapes(args.env_id)):
        raise RunError(error)
    if checkpoint is not None:
        if error := check_shapes(checkpoint, args, given):
            raise RunError(error)
        agent_from_checkpoint(checkpoint)  # the weights fit, or CheckpointError
    return args, checkpoint


def evaluate_checkpoint(args: RunArgs, checkpoint: dict, given: set[str], capture_video: bool) -> int:
    """--eval-checkpoint: evaluate, play (--render) or export (--export) a trained policy."""
    device = torch.device("cuda" if args.cuda else "cpu")
    agent = agent_from_checkpoint(checkpoint, device)
    step, run_dir = checkpoint["global_step"], os.path.dirname(os.path.abspath(args.eval_checkpoint))
    if args.render:
        watch(agent, args.env_id, args.eval_episodes if "eval_episodes" in given else 5, eval_seed(args), device)
    elif args.export:
        print(export_onnx(agent, args.env_id, args.export))
    else:  # videos only when asked on this command line, not because the run was trained with them
        video_dir = os.path.join(run_dir, "videos", f"eval_checkpoint_step_{step}") if capture_video else None
        report_evaluation(evaluate(agent, args.env_id, args.eval_episodes, eval_seed(args), device, video_dir),
                          None, step)
    return 0


def finish(args: RunArgs, run_dir: str, agent: Agent, harness: Harness) -> int:
    """The deterministic evaluation at the end of a run, and evaluation.json."""
    progress = harness.progress
    print(f"final evaluation: {args.eval_episodes} episodes of the deterministic policy", flush=True)
    video_dir = os.path.join(run_dir, "videos", "eval") if args.capture_video else None
    try:
        eval_returns = evaluate(agent, args.env_id, args.eval_episodes, eval_seed(args),
                                next(agent.parameters()).device, video_dir)
    except OSError as e:  # its videos
        raise RunError(f"cannot write the evaluation's videos into {run_dir} ({os_error_reason(e)}); "
                       f"{harness.last_checkpoint()}", code=1) from None
    if progress.target_reached:
        print(f"--target-return {args.target_return} reached at step {progress.target_reached[0]:,}, after "
              f"{progress.target_reached[1]:.0f} s of training")
    reached = progress.target_reached or (None, None)
    try:
        report_evaluation(eval_returns, os.path.join(run_dir, "evaluation.json"), progress.global_step,
                          target_return=args.target_return, target_reached_step=reached[0],
                          target_reached_seconds=reached[1])
    except OSError as e:
        raise RunError(f"cannot write the evaluation into {run_dir} ({os_error_reason(e)}); "
                       f"{harness.last_checkpoint()}", code=1) from None
    # The folder that holds this run: a resumed copy of a run is not in the runs_dir it was trained in.
    print(f"run dir: {run_dir}\n  tensorboard --logdir {os.path.dirname(run_dir)}")
    return 0


def quit_at_once(signum, frame):
    """Ctrl-C outside training and the final evaluation (start-up, --eval-checkpoint): nothing is
    left to save, so exit at once (130), removing any temp file being written. Raised as
    KeyboardInterrupt, it could land in native code (an abort) or in a library's catch-all."""
    for tmp in list(TEMP_FILES):
        try:
            os.remove(tmp)
        except OSError:
            pass
    try:
        sys.stdout.flush()
        os.write(2, b"\ninterrupted\n")
    except (OSError, ValueError):
        pass
    os._exit(130)


class EvaluationStopped(Exception):
    """A signal during the final evaluation (raised by stop_evaluation, the handler then)."""


def stop_evaluation(signum, frame):
    raise EvaluationStopped(signum)


def finish_or_resume(args: RunArgs, run_dir: str, agent: Agent, harness: Harness) -> int:
    """finish(), with Ctrl-C, SIGTERM and SIGHUP stopping it in one line: the run is trained and
    saved, and --resume runs the evaluation that was stopped."""
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    for signum in signals:
        signal.signal(signum, stop_evaluation)
    try:
        return finish(args, run_dir, agent, harness)
    except EvaluationStopped as e:
        signum = e.args[0]
        raise RunError(f"{signal.Signals(signum).name} during the final evaluation, which was not written; the run is "
                       f"trained and {harness.last_checkpoint()}: `python {SCRIPT}.py --resume "
                       f"{os.path.join(run_dir, 'checkpoint.pt')}` runs the evaluation", code=128 + signum) from None
    finally:  # as before: Ctrl-C a KeyboardInterrupt, the default action for the others
        for other in signals:
            signal.signal(other, signal.default_int_handler if other == signal.SIGINT else signal.SIG_DFL)


def open_run(args: RunArgs, checkpoint: Optional[dict], given: set[str], agent: Agent,
             optimizer: torch.optim.Optimizer, state: dict):
    """(run directory, progress to start from, its lock): a new run's, or the resumed run's,
    restored from the checkpoint and checked. The lock is held while the returned file is open."""
    if checkpoint is None:
        try:
            run_dir = new_run_dir(args)
        except OSError as e:
            raise RunError(f"cannot create the run directory ({os_error_reason(e)}): pick another --runs-dir or "
                           "--exp-name") from None
        return run_dir, Progress(), lock_run_dir(run_dir)
    run_dir = os.path.dirname(os.path.abspath(args.resume))
    restore(agent, optimizer, state, checkpoint)
    # An explicit --target-return is a new target; else one reached before ends the run.
    reached = None if "target_return" in given else checkpoint.get("target_reached")
    start = Progress(checkpoint["global_step"], checkpoint["iteration"], checkpoint["best_eval"],
                     tuple(reached) if reached else None)
    if error := check_resume(checkpoint, args, args.resume, start):
        raise RunError(error)
    lock = lock_run_dir(run_dir)
    remove_stale_temp_files(run_dir)  # left by a process killed while writing
    return run_dir, start, lock


def run(cli: RunArgs, argv: list[str]) -> int:
    given = explicit_flags(argv)
    args, checkpoint = prepare(cli, given)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args, checkpoint, given, cli.capture_video)
    (agent, optimizer), state = make_agent_and_optimizer(args), training_state(args)
    run_dir, start, lock = open_run(args, checkpoint, given, agent, optimizer, state)  # noqa: F841 (lock: held)
    if final_step(args, start.global_step) <= start.global_step or start.target_reached:
        print(f"{run_dir} is trained to step {start.global_step:,}; its final evaluation is missing: running it")
        return finish_or_resume(args, run_dir, agent, Harness(args, run_dir, agent, optimizer, start))
    if checkpoint is not None:
        print(f"resuming {run_dir} at step {start.global_step:,}")
    print(f"{SCRIPT}: {args.env_id}, {args.batch_size}-step batches ({args.num_envs} envs x {args.num_steps} "
          f"steps) to step {final_step(args, start.global_step):,}, minibatch {args.minibatch_size}, run dir {run_dir}")
    step_fn = choose_gradient_step(args, agent, optimizer, forced="compile" in given)
    if step_fn is not gradient_step:
        print("compiling the gradient step (torch.compile): the first iteration takes up to ~20 s longer on a "
              "machine's first run, a few seconds once Inductor's cache holds the code (--no-compile: eager)")
    harness = Harness(args, run_dir, agent, optimizer, start, None, step_fn is not gradient_step, state)
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    for signum in signals:
        signal.signal(signum, harness)
    envs = None
    try:
        harness.writer = make_writer(args, run_dir, start.global_step)
        envs = make_training_envs(args, run_dir, start.global_step)
        train(args, agent, optimizer, envs, start.global_step, step_fn, harness.after_iteration, **state)
        envs.close()  # the last video, then TensorBoard's last events, reach the disk here
        harness.writer.close()
    except Diverged as e:
        raise RunError(f"training diverged in the iteration after step {harness.progress.global_step:,} ({e}); nothing "
                       f"was saved after it: {harness.last_checkpoint()}. Try a lower --learning-rate than "
                       f"{args.learning_rate}", code=1) from None
    except OSError as e:  # TensorBoard or video files
        raise RunError(f"cannot write in {run_dir} ({os_error_reason(e)}): training stopped; "
                       f"{harness.last_checkpoint()}", code=1) from None
    finally:
        for opened in (envs, harness.writer):  # after an error; a second close does nothing
            try:
                if opened is not None:
                    opened.close()
            except OSError:
                pass  # the error being raised says it already
    progress = harness.progress
    if harness.signum:
        print(f"stopped at step {progress.global_step:,}; checkpoint saved. Resume with:\n"
              f"  python {SCRIPT}.py --resume {os.path.join(run_dir, 'checkpoint.pt')}", file=sys.stderr)
        return 128 + harness.signum
    return finish_or_resume(args, run_dir, agent, harness)


def main(argv: Optional[list[str]] = None) -> int:
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    cli = tyro.cli(RunArgs, args=argv, description=__doc__.split("\n\n")[0])
    # One torch thread: for 64-wide layers a second thread costs more in sync than it gains.
    torch.set_num_threads(1)
    try:
        return run(cli, argv)
    except (RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)


if __name__ == "__main__":
    sys.stdout, sys.stderr = QuietStream(sys.stdout), QuietStream(sys.stderr)
    threading.excepthook = quiet_thread_errors  # a write error in a thread is said once, by the main thread
    signal.signal(signal.SIGINT, quit_at_once)  # until training (or the final evaluation) takes Ctrl-C over
    # After a video write failed (said in one line), the recorder repeats it when the process exits.
    warnings.filterwarnings("ignore", message=".*Unable to save last video")
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C outside training (start-up, evaluation): nothing left to save
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

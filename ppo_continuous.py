"""PPO for continuous actions, in one file: LunarLanderContinuous-v3 by default.

Usage
    python ppo_continuous.py --total-timesteps 2000000        # train, checkpoint, then evaluate
    python ppo_continuous.py --env-id Pendulum-v1 --total-timesteps 200000
    python ppo_continuous.py --eval-checkpoint runs/RUN/checkpoint.pt --capture-video
    python ppo_continuous.py --resume runs/RUN/checkpoint.pt  # continue an interrupted run
    python ppo_continuous.py --help                          # every flag, with its meaning

Words used below
    iteration    collect a rollout of num_steps steps in each of num_envs envs (one batch),
                 then optimise on it
    epoch        one pass over the whole batch, in shuffled minibatches
    minibatch    batch_size // num_minibatches transitions: one gradient step
    global_step  environment steps taken so far, counted over all envs

Reading guide: 1 Hyperparameters, 2 Environment, 3 Agent, 4 Advantages (GAE), 5 PPO loss,
6 Training, 7 Evaluation, 8 Checkpoints and the command line.
The twin, ppo_discrete.py, has a categorical policy and no normalization; the differences
here are the Gaussian policy (section 3), action clipping (section 6), and observation and
reward normalization (sections 3 and 6). `compute_gae` and `ppo_loss` are the same text in both.

References: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347);
Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv:1506.02438);
Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track), cited as [37-n]
for its 13 core details and [37-cn] for its 9 continuous-action details.
"""

import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

SCRIPT = "ppo_continuous"
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# 1. Hyperparameters
# ---------------------------------------------------------------------------------------------
@dataclass
class Args:
    # Experiment
    exp_name: str = SCRIPT
    """name of the experiment: part of the run directory's name"""
    seed: int = 1
    """seed of torch, numpy, random and the training envs (env i gets seed + i)"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic (CleanRL's flag; only cuDNN kernels on a GPU care)"""
    cuda: bool = False
    """train on the GPU (CleanRL's default is on; 64-wide MLPs train faster on the CPU)"""
    capture_video: bool = False
    """record mp4 videos of env 0 during training and of the evaluation episodes"""
    runs_dir: str = "runs"
    """folder that holds one sub-folder per run (TensorBoard logs, checkpoints, videos)"""

    # Algorithm. CleanRL's ppo_continuous_action.py is tuned for MuJoCo (1 env x 2048 steps,
    # 32 minibatches, 10 epochs, gamma 0.99, lambda 0.95). Here, rl-baselines3-zoo's
    # LunarLander settings, as in ppo_discrete.py, without its entropy bonus; each difference
    # says why. Trials and results: benchmark/RESULTS.md.
    env_id: str = "LunarLanderContinuous-v3"
    """Gymnasium id of an env with a Box action space and a flat Box observation"""
    total_timesteps: int = 2_000_000
    """environment steps to train for, over all envs"""
    # As CleanRL. Annealed to 0, which settles the landing late in training.
    learning_rate: float = 3e-4
    """Adam learning rate at the start (annealed linearly to 0 with --anneal-lr)"""
    # CleanRL: 1 x 2048. 16 envs: a 16-row forward costs about what a 1-row one does. Longer
    # rollouts: a batch of 16384 steps spans many of Lunar Lander's episodes (up to 1000 steps).
    num_envs: int = 16
    """parallel envs in the (synchronous) vector env"""
    num_steps: int = 1024
    """steps per env in each rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training [37-4]"""
    # CleanRL: 0.99 and 0.95. Landing pays its +100 hundreds of steps after the approach
    # began: a longer horizon (1 / (1 - gamma) = 1000 steps) sees it.
    gamma: float = 0.999
    """discount factor"""
    gae_lambda: float = 0.98
    """lambda of Generalized Advantage Estimation"""
    # CleanRL: 32 x 10 epochs. Minibatches of 64 and 4 epochs as the zoo: one gradient step
    # per 16 samples; CleanRL's 10 epochs would cost 2.5 times the update time.
    num_minibatches: int = 256
    """minibatches per epoch"""
    update_epochs: int = 4
    """passes over each batch"""
    norm_adv: bool = True
    """normalize advantages within each minibatch [37-7]"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon (also the value clip range with --clip-vloss)"""
    # CleanRL: on. Value clipping did not help, or hurt, in Andrychowicz et al. 2021 (sec. 3.2).
    clip_vloss: bool = False
    """clip the value loss around the old values [37-9]"""
    # As CleanRL: 0. An entropy bonus of 0.01 kept the Gaussian wide and the landings erratic
    # (final evaluation 201 +/- 92 against 256 +/- 30 without, seed 1, benchmark/RESULTS.md).
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold [37-11]"""
    target_kl: Optional[float] = None
    """stop the epochs of an iteration early once approx_kl exceeds this (off when unset)"""
    hidden_size: int = 64
    """width of the two hidden layers of the actor and of the critic"""
    log_std_init: float = 0.0
    """initial log standard deviation of the Gaussian policy (0: std 1)"""
    norm_obs: bool = True
    """normalize observations by their running mean and std, clipped to [-10, 10] [37-c6,c7]"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return, clipped to [-10, 10] [37-c8,c9]"""

    # Run control: these never change what is learned
    eval_episodes: int = 100
    """episodes of the deterministic evaluation at the end (and of --eval-checkpoint)"""
    eval_every: int = 0
    """evaluate every N iterations during training, keep the best policy as best.pt (0: off)"""
    periodic_eval_episodes: int = 20
    """episodes of each periodic evaluation (--eval-every)"""
    checkpoint_every: int = 50
    """write checkpoint.pt every N iterations (it is also written at the end and on Ctrl-C)"""
    print_every: float = 5.0
    """seconds between progress lines"""
    resume: Optional[str] = None
    """checkpoint.pt of a run to continue in its own run directory"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint with the deterministic policy, and do not train"""

    # Derived sizes: computed, never flags (CleanRL overwrites such flags silently).
    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size


# Flags that --resume and --eval-checkpoint always take from the command line, never from the
# checkpoint: where to run and what to do. Every other flag comes from the checkpoint unless given.
FROM_COMMAND_LINE = {"cuda", "resume", "eval_checkpoint"}


def check_args(args: Args) -> Optional[str]:
    """The first thing wrong with the flags, as one line saying what to do, or None."""
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                 "hidden_size", "eval_episodes", "periodic_eval_episodes", "checkpoint_every"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.eval_every < 0:
        return f"--eval-every must be 0 (off) or positive, got {args.eval_every}"
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            return f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}"
    if args.batch_size % args.num_minibatches:
        return (f"the batch of {args.batch_size} (--num-envs x --num-steps) does not split into "
                f"{args.num_minibatches} equal minibatches: change --num-minibatches")
    if args.norm_adv and args.minibatch_size < 2:
        return (f"minibatches of {args.minibatch_size} cannot normalize advantages: lower "
                "--num-minibatches or pass --no-norm-adv")
    if args.total_timesteps < args.batch_size:
        return (f"--total-timesteps {args.total_timesteps} is less than one batch of "
                f"{args.batch_size} (--num-envs x --num-steps): raise it or shrink the batch")
    if args.resume and args.eval_checkpoint:
        return "give --resume or --eval-checkpoint, not both"
    if args.cuda and not torch.cuda.is_available():
        return "--cuda was given but torch sees no CUDA device: drop --cuda"
    return None


# ---------------------------------------------------------------------------------------------
# 2. Environment
# ---------------------------------------------------------------------------------------------
def make_env(env_id: str, video_dir: Optional[str] = None, video_trigger=None):
    """A thunk that builds one env; `video_dir` records its episodes as mp4."""

    def thunk():
        if video_dir is not None:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=video_trigger,
                                           disable_logger=True)
        else:
            env = gym.make(env_id)
        # Puts the episode's return and length into the info of its last step.
        return gym.wrappers.RecordEpisodeStatistics(env)

    return thunk


def make_vector_env(env_fns) -> gym.vector.SyncVectorEnv:
    # SyncVectorEnv: on 2 cores, AsyncVectorEnv's inter-process traffic costs more than it gains
    # (3x slower here). SAME_STEP autoreset: when an episode ends, step() already returns the
    # first observation of the next one and puts the true last observation in
    # infos["final_obs"]. So every stored transition is real (the 1.x default, NEXT_STEP, would
    # insert a dummy step after each episode), and the final observation is at hand to
    # bootstrap a truncated episode from.
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def check_env(env_id: str) -> Optional[str]:
    """Whether env_id can be trained by this script: None, or a one-line error."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:  # unknown id, missing dependency (e.g. box2d), bad version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot make env {env_id!r} ({reason}): pick an id from gymnasium.envs.registry"
    try:
        if isinstance(env.action_space, gym.spaces.Discrete):
            return f"{env_id} has a discrete action space: use ppo_discrete.py"
        if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
            return f"{env_id} has a {env.action_space} action space: this script needs a flat Box"
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            return f"{env_id} observations are not a flat Box (got {space}): this script needs a vector"
    finally:
        env.close()
    return None


def env_shapes(env_id: str) -> tuple[int, int]:
    env = gym.make(env_id)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    return obs_dim, action_dim


# ---------------------------------------------------------------------------------------------
# 3. Agent
# ---------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    # Orthogonal weights scaled by `std`, zero biases [37-2].
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of batches (Chan et al.'s parallel formula).

    Buffers, not parameters: they travel in the state_dict, so every checkpoint carries them,
    and no gradient or optimizer touches them. Only the training loop calls update().
    """

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x: (B, *shape), a batch of samples."""
        x = x.double()
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class Agent(nn.Module):
    """A diagonal Gaussian policy and a critic, as separate MLPs (no shared trunk [37-13]).

    obs: (B, obs_dim) raw observations; the agent normalizes them itself, so its statistics
    are part of the policy. The actor gives (B, action_dim) means; the log-std is one learned
    parameter per action dimension, independent of the state [37-c2]. The critic gives (B,).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_size: int = 64, norm_obs: bool = True,
                 log_std_init: float = 0.0):
        super().__init__()
        self.norm_obs = norm_obs
        self.obs_rms = RunningMeanStd((obs_dim,))
        # Statistics of the discounted return, for reward scaling: training state, not policy,
        # kept here so that one state_dict holds every running statistic.
        self.return_rms = RunningMeanStd(())
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)), nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
            # A 0.01 scale starts every action mean near 0 [37-2].
            layer_init(nn.Linear(hidden_size, action_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.full((action_dim,), log_std_init))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.norm_obs:
            return obs
        return ((obs - self.obs_rms.mean) * torch.rsqrt(self.obs_rms.var + 1e-8)).clamp(-10.0, 10.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.normalize(obs)).squeeze(-1)

    def sample_action(self, obs: torch.Tensor) -> torch.Tensor:
        """One unclipped action per row, sampled from N(mean(obs), std^2)."""
        mean = self.actor(self.normalize(obs))
        return mean + self.actor_logstd.exp() * torch.randn_like(mean)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalize(obs))

    def logprob_entropy_value(self, obs: torch.Tensor, action: torch.Tensor):
        """log pi(action|obs), the policy's entropy and V(obs), each of shape (B,).

        Written out rather than through torch.distributions.Normal, whose object costs more
        than the arithmetic; independent dimensions, so log-probs and entropies add up.
        """
        x = self.normalize(obs)
        mean = self.actor(x)
        logstd = self.actor_logstd.expand_as(mean)
        logprob = (-0.5 * ((action - mean) / logstd.exp()) ** 2 - logstd - HALF_LOG_2PI).sum(-1)
        entropy = (0.5 + HALF_LOG_2PI + logstd).sum(-1)
        return logprob, entropy, self.critic(x).squeeze(-1)


HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))


# ---------------------------------------------------------------------------------------------
# 4. Advantages
# ---------------------------------------------------------------------------------------------
def compute_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """Generalized Advantage Estimation (GAE paper, eq. 16): TD errors, then a discounted sum.

    Every input is a float tensor of shape (T, N): T steps of N envs.
      rewards[t]       reward received after the action at step t
      values[t]        V(s_t)
      next_values[t]   V(s_t+1) of the true next state: when the episode ended at t, the value of
                       its final observation, never of the next episode's first one
      terminations[t]  1 if s_t+1 is terminal, so nothing follows it: no bootstrap
      dones[t]         1 if the episode ended at t, terminated or truncated: the sum stops there
    Returns (advantages, returns), each (T, N); returns = advantages + values, the value targets.
    A time-limit truncation has dones = 1 but terminations = 0: its TD error still bootstraps
    from V(final observation) instead of pretending that the episode ended.
    """
    # delta_t = r_t + gamma * V(s_t+1) * (1 - terminal) - V(s_t)
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    # A_t = delta_t + gamma * lambda * A_t+1, cut where the episode ended. The backward loop runs
    # in numpy: a numpy op on a row costs ~1 us, a torch op ~5 us, and there are T of them.
    deltas_np = deltas.cpu().numpy()
    decay = (gamma * gae_lambda * (1.0 - dones)).cpu().numpy()
    advantages = np.zeros_like(deltas_np)
    running = np.zeros_like(deltas_np[0])  # A_T = 0 past the end of the rollout
    for t in reversed(range(len(deltas_np))):
        running = deltas_np[t] + decay[t] * running
        advantages[t] = running
    advantages = torch.from_numpy(advantages).to(deltas.device)
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------
# 5. PPO loss
# ---------------------------------------------------------------------------------------------
def ppo_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy, *,
             clip_coef, vf_coef, ent_coef, clip_vloss):
    """The PPO objective on one minibatch, as a loss to minimise.

    Every input is a 1-D tensor over the minibatch; `advantages` arrive already normalized when
    that is on. Returns (loss, parts): parts holds pg_loss, v_loss, entropy_loss, approx_kl,
    old_approx_kl and clipfrac as detached 0-d tensors.
    """
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    # Clipped surrogate (PPO paper, eq. 7): the pessimistic minimum of the two objectives,
    # written as the maximum of their negatives.
    pg_loss = torch.max(-advantages * ratio,
                        -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)).mean()
    if clip_vloss:
        # The new value may move at most clip_coef from the old one without paying for it [37-9].
        v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    # PPO paper, eq. 9, with the entropy bonus and the value loss weighted
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    with torch.no_grad():
        parts = {
            "pg_loss": pg_loss.detach(),
            "v_loss": v_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            # KL(old || new) estimators: the naive one, and Schulman's unbiased, positive
            # (r - 1) - log r [37-12]
            "approx_kl": ((ratio - 1.0) - logratio).mean(),
            "old_approx_kl": (-logratio).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_coef).float().mean(),
        }
    return loss, parts


# ---------------------------------------------------------------------------------------------
# 6. Training
# ---------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next safe point and save a checkpoint."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        if self.signum:  # a second Ctrl-C: leave at once; the last checkpoint is intact
            print("\nsecond interrupt: exiting without a new checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
              "(press Ctrl-C again to quit at once)", file=sys.stderr)


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def discounted_returns(rewards, dones, running, gamma):
    """Per env, the discounted return so far, G_t = gamma * G_t-1 + r_t, restarted after each
    episode's end: the quantity whose running std reward scaling divides by [37-c8].

    rewards, dones: (T, N) numpy arrays; running: (N,) G carried over from the previous rollout.
    Returns (G of shape (T, N), the (N,) G to carry into the next rollout).
    """
    returns = np.zeros(rewards.shape)
    for t in range(len(rewards)):
        running = running * gamma + rewards[t]
        returns[t] = running
        running = np.where(dones[t] == 1, 0.0, running)
    return returns, running


def train(args: Args, run_dir: str, checkpoint: Optional[dict] = None, stop: Optional[StopRequest] = None):
    """Train PPO; returns (agent, global_step, timings). `checkpoint` resumes a saved run.

    `timings` splits the wall time into env stepping, action selection, storage, the update
    phase (GAE included) and the rest (logging, evaluation, checkpoints), in seconds;
    benchmark/throughput.py reads it.
    """
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow to import

    stop = stop or StopRequest()
    device = torch.device("cuda" if args.cuda else "cpu")
    seed_everything(args.seed, args.torch_deterministic)  # before the weights are drawn
    obs_dim, action_dim = env_shapes(args.env_id)
    agent = Agent(obs_dim, action_dim, args.hidden_size, args.norm_obs, args.log_std_init).to(device)
    # fused: one kernel updates every parameter (56 us a step here, against 230 us for the
    # default per-parameter loop). eps=1e-5 as in the PPO baselines [37-3].
    params = list(agent.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
    global_step, start_iteration = 0, 0
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"]
        set_rng_state(checkpoint["rng"])
    # On resume, drop what an interrupted run logged after its checkpoint (steps > global_step).
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if global_step else None)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in asdict(args).items()))

    # A resumed run records into its own folder: the episode numbers start again from 0.
    video_name = "train" if global_step == 0 else f"train_from_step_{global_step}"
    video_dir = os.path.join(run_dir, "videos", video_name) if args.capture_video else None
    envs = make_vector_env(
        [make_env(args.env_id, video_dir if i == 0 else None, capped_cubic) for i in range(args.num_envs)])
    # Env i starts from seed + i; a resumed run starts new episodes from fresh seeds.
    obs, _ = envs.reset(seed=args.seed + start_iteration * args.num_envs)

    # Rollout storage, preallocated as numpy: writing a row costs less than a torch index-put.
    T, N = args.num_steps, args.num_envs
    obs_buf = np.zeros((T, N, obs_dim), dtype=np.float32)
    next_obs_buf = np.zeros((T, N, obs_dim), dtype=np.float32)  # true s_t+1, final obs included
    actions_buf = np.zeros((T, N, action_dim), dtype=np.float32)
    rewards_buf = np.zeros((T, N), dtype=np.float32)
    terminations_buf = np.zeros((T, N), dtype=np.float32)
    dones_buf = np.zeros((T, N), dtype=np.float32)

    low, high = envs.single_action_space.low, envs.single_action_space.high
    discounted_return = np.zeros(N)  # per env, for reward scaling
    timings = dict(env=0.0, action=0.0, storage=0.0, update=0.0, other=0.0)
    recent_returns: list[float] = []
    best_eval = checkpoint.get("best_eval", -np.inf) if checkpoint else -np.inf
    start_time = last_print = time.perf_counter()
    start_step = global_step
    iteration = start_iteration
    def save(name: str) -> None:  # the loop's current step, iteration and best evaluation
        save_checkpoint(os.path.join(run_dir, name), agent=agent, optimizer=optimizer, args=args,
                        global_step=global_step, iteration=iteration, best_eval=best_eval)

    print(f"{SCRIPT}: {args.env_id}, {args.num_iterations} iterations of {args.batch_size} steps "
          f"({N} envs x {T} steps), minibatch {args.minibatch_size}, run dir {run_dir}")

    while iteration < args.num_iterations and not stop.signum:
        # Linear learning-rate annealing [37-4]: from learning_rate at the first iteration down to
        # learning_rate / num_iterations at the last one.
        frac = 1.0 - iteration / args.num_iterations if args.anneal_lr else 1.0
        optimizer.param_groups[0]["lr"] = args.learning_rate * frac

        # --- Rollout: num_steps steps of every env with the current policy ---
        with torch.inference_mode():  # no autograd bookkeeping while acting
            for step in range(T):
                t0 = time.perf_counter()
                obs = np.asarray(obs, dtype=np.float32)
                obs_buf[step] = obs
                action = agent.sample_action(torch.from_numpy(obs).to(device)).cpu().numpy()
                t1 = time.perf_counter()
                # Only the env's copy is clipped to the bounds: the unclipped sample is what the
                # Gaussian produced, so it is what is stored and scored by the log-prob [37-c5].
                obs, reward, terminated, truncated, infos = envs.step(np.clip(action, low, high))
                t2 = time.perf_counter()
                actions_buf[step] = action
                rewards_buf[step] = reward
                terminations_buf[step] = terminated
                done = terminated | truncated
                dones_buf[step] = done
                next_obs_buf[step] = obs
                global_step += N
                if done.any():
                    # SAME_STEP autoreset: `obs` already starts the next episode; the true s_t+1
                    # of an ended episode is in final_obs (needed to bootstrap a truncation).
                    ended = np.flatnonzero(infos["_final_obs"])
                    next_obs_buf[step, ended] = np.stack(infos["final_obs"][ended])
                    episode = infos["final_info"]["episode"]
                    for i in np.flatnonzero(infos["final_info"]["_episode"]):
                        recent_returns.append(float(episode["r"][i]))
                        writer.add_scalar("charts/episodic_return", episode["r"][i], global_step)
                        writer.add_scalar("charts/episodic_length", episode["l"][i], global_step)
                timings["action"] += t1 - t0
                timings["env"] += t2 - t1
                timings["storage"] += time.perf_counter() - t2
                if stop.signum:
                    break
        if stop.signum:  # drop the incomplete rollout: the weights are the last iteration's
            global_step -= (step + 1) * N
            break
        t_update = time.perf_counter()

        # --- Advantages. The policy did not change during the rollout, so the old log-probs
        # and values of all T*N steps come from one batched pass instead of T small ones. ---
        if args.norm_reward:
            # Divide rewards by the running std of the discounted return (not of the reward),
            # so value targets keep a steady scale [37-c8]; the mean is not subtracted, which
            # would change the problem. One set of statistics for all envs.
            returns_seen, discounted_return = discounted_returns(rewards_buf, dones_buf, discounted_return, args.gamma)
            agent.return_rms.update(torch.from_numpy(returns_seen.reshape(-1)).to(device))
            scale = float(torch.sqrt(agent.return_rms.var + 1e-8))
            rewards = np.clip(rewards_buf / scale, -10.0, 10.0).astype(np.float32)
        else:
            rewards = rewards_buf
        b_obs = torch.from_numpy(obs_buf).to(device).reshape(-1, obs_dim)
        b_actions = torch.from_numpy(actions_buf).to(device).reshape(-1, action_dim)
        with torch.no_grad():
            b_logprobs, _, b_values = agent.logprob_entropy_value(b_obs, b_actions)
            next_values = agent.value(torch.from_numpy(next_obs_buf).to(device))
            advantages, returns = compute_gae(
                torch.from_numpy(rewards).to(device), b_values.reshape(T, N), next_values,
                torch.from_numpy(terminations_buf).to(device), torch.from_numpy(dones_buf).to(device),
                args.gamma, args.gae_lambda)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        # --- Optimise: update_epochs passes over the batch in shuffled minibatches ---
        batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)
        sums = torch.zeros(6, device=device)  # parts summed over minibatches, read once: one sync
        n_minibatches = 0
        for epoch in range(args.update_epochs):
            # One gather per epoch; the minibatches below are then cheap contiguous slices.
            perm = torch.randperm(args.batch_size, device=device)
            shuffled = [x[perm] for x in batch]
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_obs, mb_actions, mb_logprobs, mb_adv, mb_returns, mb_values = (
                    x[start:start + args.minibatch_size] for x in shuffled)
                newlogprob, entropy, newvalue = agent.logprob_entropy_value(mb_obs, mb_actions)
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                loss, parts = ppo_loss(newlogprob, mb_logprobs, mb_adv, newvalue, mb_values, mb_returns,
                                       entropy, clip_coef=args.clip_coef, vf_coef=args.vf_coef,
                                       ent_coef=args.ent_coef, clip_vloss=args.clip_vloss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
                optimizer.step()
                sums += torch.stack(list(parts.values()))
                n_minibatches += 1
            if args.target_kl is not None and parts["approx_kl"].item() > args.target_kl:
                break  # early stopping on the KL of the last minibatch [37-12]
        # Observation statistics move only between iterations: the rollout, its old log-probs and
        # the update above all saw the same normalization, so the PPO ratio compares like with
        # like. (Gymnasium's NormalizeObservation wrapper updates at every step, and its vector
        # version refuses the SAME_STEP autoreset used here.)
        if args.norm_obs:
            agent.obs_rms.update(b_obs)
        iteration += 1
        t_other = time.perf_counter()
        timings["update"] += t_other - t_update

        # --- Log ---
        means = dict(zip(parts.keys(), (sums / n_minibatches).tolist()))
        var_returns = b_returns.var()
        explained_var = (1.0 - (b_returns - b_values).var() / var_returns).item() if var_returns > 0 else float("nan")
        sps = (global_step - start_step) / (time.perf_counter() - start_time)
        for tag, value in [("charts/learning_rate", optimizer.param_groups[0]["lr"]),
                           ("charts/SPS", sps),
                           ("losses/value_loss", means["v_loss"]),
                           ("losses/policy_loss", means["pg_loss"]),
                           ("losses/entropy", means["entropy_loss"]),
                           ("losses/approx_kl", means["approx_kl"]),
                           ("losses/old_approx_kl", means["old_approx_kl"]),
                           ("losses/clipfrac", means["clipfrac"]),
                           ("losses/explained_variance", explained_var)]:
            writer.add_scalar(tag, value, global_step)
        now = time.perf_counter()
        if now - last_print >= args.print_every or iteration in (start_iteration + 1, args.num_iterations):
            last_print = now
            eta = (args.num_iterations * args.batch_size - global_step) / max(sps, 1e-9)
            mean_return = f"{np.mean(recent_returns[-20:]):8.1f}" if recent_returns else "     n/a"
            print(f"step {global_step:>10,}/{args.num_iterations * args.batch_size:,} "
                  f"({100 * global_step / (args.num_iterations * args.batch_size):3.0f}%) | "
                  f"{sps:6,.0f} steps/s | return {mean_return} (last 20 episodes) | "
                  f"ETA {format_seconds(eta)}", flush=True)

        # --- Periodic evaluation and checkpoints ---
        if args.eval_every and iteration % args.eval_every == 0:
            eval_returns = evaluate(agent, args.env_id, args.periodic_eval_episodes, eval_seed(args), device)
            writer.add_scalar("eval/mean_return", eval_returns.mean(), global_step)
            print(f"eval at step {global_step:,}: {eval_returns.mean():.1f} +/- {eval_returns.std():.1f} "
                  f"over {len(eval_returns)} episodes", flush=True)
            if eval_returns.mean() > best_eval:
                best_eval = float(eval_returns.mean())
                save("best.pt")
        if iteration % args.checkpoint_every == 0 or iteration == args.num_iterations:
            save("checkpoint.pt")
        timings["other"] += time.perf_counter() - t_other

    if stop.signum:
        save("checkpoint.pt")
    envs.close()
    writer.close()
    return agent, global_step, timings


def capped_cubic(episode_id: int) -> bool:
    """Record episodes 0, 1, 8, 27, ..., 729, then every 1000th (CleanRL's schedule)."""
    return round(episode_id ** (1 / 3)) ** 3 == episode_id if episode_id < 1000 else episode_id % 1000 == 0


# ---------------------------------------------------------------------------------------------
# 7. Evaluation
# ---------------------------------------------------------------------------------------------
def eval_seed(args: Args) -> int:
    return args.seed + 1_000_000  # far from the training envs' seeds (seed + i)


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, n_episodes: int, seed: int, device="cpu",
             video_dir: Optional[str] = None, max_envs: int = 25) -> np.ndarray:
    """Returns of n_episodes episodes of the deterministic (mean) policy, run vectorized.

    The agent's normalization statistics are frozen here: only training updates them.

    Env i of min(n_episodes, max_envs) envs is seeded with seed + i and plays a fixed share of
    the episodes; counting the first n_episodes to finish instead would favour short ones.
    """
    n_envs = min(n_episodes, max_envs)
    quota = np.array([n_episodes // n_envs + (i < n_episodes % n_envs) for i in range(n_envs)])
    envs = make_vector_env([make_env(env_id, video_dir if i == 0 else None,
                                     lambda ep: ep < quota[0]) for i in range(n_envs)])
    returns: list[list[float]] = [[] for _ in range(n_envs)]
    obs, _ = envs.reset(seed=seed)
    while any(len(r) < q for r, q in zip(returns, quota)):
        action = agent.mean_action(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, infos = envs.step(np.clip(action.cpu().numpy(), envs.single_action_space.low,
                                                envs.single_action_space.high))
        if "final_info" in infos:
            for i in np.flatnonzero(infos["final_info"]["_episode"]):
                if len(returns[i]) < quota[i]:
                    returns[i].append(float(infos["final_info"]["episode"]["r"][i]))
    envs.close()
    return np.array([r for per_env in returns for r in per_env])


# ---------------------------------------------------------------------------------------------
# 8. Checkpoints and the command line
# ---------------------------------------------------------------------------------------------
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


def save_checkpoint(path: str, *, agent, optimizer, args: Args, global_step: int, iteration: int,
                    best_eval: float) -> None:
    """Write atomically: a temp file, flushed to disk, then renamed over the old checkpoint."""
    obs_dim, action_dim = agent.actor[0].in_features, agent.actor[-1].out_features
    data = {"script": SCRIPT, "format": CHECKPOINT_FORMAT, "args": asdict(args),
            "obs_dim": obs_dim, "action_dim": action_dim, "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(), "global_step": global_step, "iteration": iteration,
            "best_eval": float(best_eval), "rng": get_rng_state()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: the old checkpoint is untouched
            os.remove(tmp)


class CheckpointError(Exception):
    pass


def load_checkpoint(path: str) -> dict:
    """Load and check a checkpoint of this script; CheckpointError says what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: give the path of a checkpoint.pt or best.pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds more than tensors
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              "it may be truncated or another kind of file; pick another") from None
    if not isinstance(data, dict) or data.get("script") != SCRIPT:
        other = data.get("script") if isinstance(data, dict) else None
        hint = f" (it comes from {other}.py: use that script)" if other else ""
        raise CheckpointError(f"{path} is not a checkpoint of {SCRIPT}.py{hint}")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')}, "
                              f"this script reads {CHECKPOINT_FORMAT}")
    return data


def agent_from_checkpoint(data: dict, device="cpu") -> Agent:
    """The policy a checkpoint holds, normalization statistics included."""
    agent = Agent(data["obs_dim"], data["action_dim"], data["args"]["hidden_size"], data["args"]["norm_obs"])
    agent.load_state_dict(data["model"])
    return agent.to(device)


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the Args fields given on the command line (--flag, --flag=x, --no-flag)."""
    names = {f.name for f in fields(Args)}
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=")[0].replace("-", "_")
            given.add(name[3:] if name.startswith("no_") and name[3:] in names else name)
    return given


def args_from_checkpoint(data: dict, cli: Args, given: set[str]) -> Args:
    """The checkpoint's flags, overridden by the ones given explicitly on this command line."""
    known = {f.name for f in fields(Args)}
    merged = {k: v for k, v in data["args"].items() if k in known}
    merged.update({k: getattr(cli, k) for k in given | FROM_COMMAND_LINE if k in known})
    return Args(**merged)


def check_shapes(data: dict, args: Args) -> Optional[str]:
    obs_dim, action_dim = env_shapes(args.env_id)
    if (data["obs_dim"], data["action_dim"]) != (obs_dim, action_dim):
        return (f"the checkpoint was trained for {data['obs_dim']} observations and {data['action_dim']}-D "
                f"actions, but {args.env_id} has {obs_dim} and {action_dim}: use the env it was trained on")
    hidden = data["model"]["actor.0.weight"].shape[0]
    if hidden != args.hidden_size:
        return f"the checkpoint has hidden layers of {hidden}, not {args.hidden_size}: drop --hidden-size"
    return None


def new_run_dir(args: Args) -> str:
    name = f"{args.env_id}__{args.exp_name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(args.runs_dir, name)
    os.makedirs(run_dir, exist_ok=False)  # never write into an existing run
    return run_dir


def report_evaluation(returns: np.ndarray, path: Optional[str], global_step: int) -> None:
    print(f"evaluation: {returns.mean():.1f} +/- {returns.std():.1f} over {len(returns)} episodes "
          f"of the deterministic policy", flush=True)
    if path:
        with open(path, "w") as f:
            json.dump({"global_step": global_step, "mean": float(returns.mean()),
                       "std": float(returns.std()), "returns": returns.tolist()}, f)


def main(argv: Optional[list[str]] = None) -> int:
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    cli = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    # One torch thread: for 64-wide layers a second thread costs more in sync than it gains.
    torch.set_num_threads(1)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    checkpoint, args = None, cli
    source = cli.resume or cli.eval_checkpoint
    if source:
        try:
            checkpoint = load_checkpoint(source)
        except CheckpointError as e:
            return fail(str(e))
        if cli.resume and os.path.basename(cli.resume) == "best.pt":
            return fail("--resume continues a run from its checkpoint.pt; best.pt is for --eval-checkpoint")
        args = args_from_checkpoint(checkpoint, cli, explicit_flags(argv))
    if (error := check_args(args)) or (error := check_env(args.env_id)):
        return fail(error)
    if checkpoint is not None and (error := check_shapes(checkpoint, args)):
        return fail(error)
    device = torch.device("cuda" if args.cuda else "cpu")

    if args.eval_checkpoint:
        agent = agent_from_checkpoint(checkpoint, device)
        run_dir = os.path.dirname(os.path.abspath(source))
        video_name = f"eval_checkpoint_step_{checkpoint['global_step']}"
        video_dir = os.path.join(run_dir, "videos", video_name) if args.capture_video else None
        returns = evaluate(agent, args.env_id, args.eval_episodes, eval_seed(args), device, video_dir)
        report_evaluation(returns, None, checkpoint["global_step"])
        return 0

    if checkpoint is not None:
        run_dir = os.path.dirname(os.path.abspath(source))
        print(f"resuming {run_dir} at step {checkpoint['global_step']:,}")
    else:
        try:
            run_dir = new_run_dir(args)
        except OSError as e:
            return fail(f"cannot create the run directory ({e}): pick another --runs-dir or --exp-name")

    stop = StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    agent, global_step, timings = train(args, run_dir, checkpoint, stop)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    if stop.signum:
        print(f"stopped at step {global_step:,}; checkpoint saved. Resume with:\n"
              f"  python {SCRIPT}.py --resume {checkpoint_path}", file=sys.stderr)
        return 128 + stop.signum
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C now stops the evaluation
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    total = sum(timings.values()) or 1.0
    print("time split: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in timings.items()))

    video_dir = os.path.join(run_dir, "videos", "eval") if args.capture_video else None
    returns = evaluate(agent, args.env_id, args.eval_episodes, eval_seed(args), device, video_dir)
    report_evaluation(returns, os.path.join(run_dir, "evaluation.json"), global_step)
    print(f"run dir: {run_dir}\n  tensorboard --logdir {args.runs_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C outside training (evaluation): nothing left to save
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

"""The command the README shows for each env, and what to compare it with (issue 10).

`python benchmark/learning.py --envs all` (or a list of ids) trains each entry's command on its
seeds and writes its table, data and plot under benchmark/results/. The flags are exactly what a
user types after `python SCRIPT.py --env-id ENV`; the scripts hold no per-env defaults.

Fields: script; flags (a string); total_timesteps; seeds; config (the name of the curve in the
env's results file: "default" is the script's own defaults); eval_every_steps (periodic
evaluation, about this often); threshold (only where Gymnasium's spec has no reward_threshold);
anchors (published PPO results to put beside the row, with their sample budget).
"""

ZOO = "rl-baselines3-zoo benchmark.md (PPO, 1 run, deterministic)"
CLEANRL = "CleanRL ppo.py (3 seeds)"

ENVS = {
    # ---- discrete: ppo_discrete.py ----
    "CartPole-v1": dict(
        script="ppo_discrete", config="zoo",
        flags="--num-envs 8 --num-steps 32 --num-minibatches 1 --update-epochs 20 --learning-rate 1e-3 "
              "--gamma 0.98 --gae-lambda 0.8 --ent-coef 0",
        total_timesteps=100_000, seeds=[1, 2, 3], eval_every_steps=10_000,
        anchors=f"{CLEANRL}: 490.0 +/- 6.1 at 500k; {ZOO}: 500.0 +/- 0.0 at 100k"),
    "Acrobot-v1": dict(
        script="ppo_discrete", config="default", flags="",
        total_timesteps=500_000, seeds=[1, 2, 3], eval_every_steps=49_152,
        anchors=f"{CLEANRL}: -86.4 +/- 1.3 at 500k; {ZOO}: -73.5 +/- 18.2 at 1M"),
    "MountainCar-v0": dict(
        script="ppo_discrete", config="cleanrl",
        flags="--num-envs 4 --num-steps 128 --num-minibatches 4 --update-epochs 4 --learning-rate 2.5e-4 "
              "--gamma 0.99 --gae-lambda 0.95 --clip-vloss",
        total_timesteps=500_000, seeds=[1, 2, 3], eval_every_steps=50_000,
        anchors=f"{CLEANRL}: -200.0 +/- 0.0 at 500k; {ZOO} (with observation normalization): -110.4 +/- 19.5 at 1M"),
    "LunarLander-v3": dict(
        script="ppo_discrete", config="default", flags="",
        total_timesteps=2_000_000, seeds=[1, 2, 3, 4, 5], eval_every_steps=100_000,
        anchors=f"{ZOO}: 242.1 +/- 31.8 at 1M (LunarLander-v2)"),
    # ---- continuous: ppo_continuous.py ----
    "Pendulum-v1": dict(
        script="ppo_continuous", config="zoo-no-sde-g0.97",
        flags="--num-envs 4 --num-steps 1024 --num-minibatches 16 --update-epochs 10 --learning-rate 1e-3 "
              "--gamma 0.97 --gae-lambda 0.95",
        total_timesteps=200_000, seeds=[1, 2, 3], eval_every_steps=20_000, threshold=-200.0,
        anchors=f"{ZOO} (with gSDE): -172.2 +/- 104.2 at 100k"),
    "MountainCarContinuous-v0": dict(
        script="ppo_continuous", config="default", flags="",
        total_timesteps=300_000, seeds=[1, 2, 3], eval_every_steps=30_000,
        anchors=f"{ZOO} (with gSDE): 88.3 +/- 2.6 at 20k"),
    "BipedalWalker-v3": dict(
        script="ppo_continuous", config="default", flags="",
        total_timesteps=3_000_000, seeds=[1, 2, 3], eval_every_steps=150_000,
        anchors=f"{ZOO}: 213.3 +/- 129.5 at 5M"),
    "LunarLanderContinuous-v3": dict(
        script="ppo_continuous", config="default", flags="",
        total_timesteps=2_000_000, seeds=[1, 2, 3, 4, 5], eval_every_steps=100_000,
        anchors=f"{ZOO}: 270.9 +/- 32.1 at 1M (LunarLanderContinuous-v2)"),
}

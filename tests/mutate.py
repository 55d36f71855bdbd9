"""A mutation check, run by hand: does a typical PPO bug make a behaviour test fail?

    python tests/mutate.py                    # every mutant, on the fast behaviour tests
    python tests/mutate.py --only "gamma ignored (1)" --only "no shuffling"
    python tests/mutate.py --all-tests        # the whole suite but the source-text tests
    python tests/mutate.py --tests tests/test_probes.py   # which mutants the probes alone kill
    python tests/mutate.py --list             # the mutants, without running anything

Each mutant is an exact text replacement in one or both scripts. The repo is copied once into a
temporary folder; for each mutant the scripts there are restored, mutated, and pytest runs the
behaviour tests with -x (the source-text tests, test_layout.py and test_twins.py, do not count:
they would see any edit). The table at the end names the first test that failed, or SURVIVED.
A pattern that is no longer in a script stops everything at once, naming the mutant: when the
scripts change, update the pattern. Runs one pytest at a time (one CPU-heavy job).
Exit status: 0 if every mutant was killed, 1 if one survived or broke the import, 2 on a
pattern that is not found.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ppo_discrete.py", "ppo_continuous.py")
BOTH, CONT = SCRIPTS, ("ppo_continuous.py",)
# Fast, failing-early first; the learning smokes last (the slowest).
BEHAVIOUR_TESTS = ["tests/test_math.py", "tests/test_agent.py", "tests/test_phases.py", "tests/test_behaviour.py",
                   "tests/test_continuous.py", "tests/test_probes.py", "tests/test_learning.py"]
SOURCE_TEXT_TESTS = {"tests/test_layout.py", "tests/test_twins.py"}

# (name, scripts, exact old text, new text): each old text must occur exactly once per script.
MUTANTS = [
    ("advantage sign flipped", BOTH,
     "\n    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=advantages,",
     "\n    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs, advantages=-advantages,"),
    ("truncation treated as termination", BOTH,
     "rollout.terminations[step], rollout.truncations[step] = terminated, truncated",
     "rollout.terminations[step], rollout.truncations[step] = terminated | truncated, truncated"),
    ("termination ignored (always bootstrap)", BOTH,
     "deltas = rewards + gamma * (1.0 - terminations) * next_values - values",
     "deltas = rewards + gamma * next_values - values"),
    ("truncation does not end the episode in the rollout", BOTH,
     "dones=as_tensor(np.maximum(rollout.terminations, rollout.truncations))", "dones=as_tensor(rollout.terminations)"),
    ("frozen policy (no policy gradient)", BOTH,
     "loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss",
     "loss = pg_loss.detach() - ent_coef * entropy_loss + vf_coef * v_loss"),
    ("frozen policy (the optimizer holds only the critic)", BOTH,
     "torch.optim.Adam(agent.parameters(), lr=lr,", "torch.optim.Adam(agent.critic.parameters(), lr=lr,"),
    ("random actions", BOTH,
     "action = agent.sample_action(torch.from_numpy(obs).to(device)).cpu().numpy()",
     "action = np.stack([envs.single_action_space.sample() for _ in range(len(obs))])"),
    ("no exploration (deterministic actions in the rollout)", BOTH,
     "action = agent.sample_action(torch.from_numpy(obs).to(device)).cpu().numpy()",
     "action = agent.deterministic_action(torch.from_numpy(obs).to(device)).cpu().numpy()"),
    ("value targets without the values (advantages only)", BOTH,
     "return advantages, advantages + values", "return advantages, advantages"),
    ("stale old log-probs (old = new)", BOTH,
     "\n    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=mb.logprobs,",
     "\n    loss, parts = ppo_loss(newlogprob=newlogprob, oldlogprob=newlogprob.detach(),"),
    ("old log-probs recomputed every epoch", BOTH,
     "perm = torch.randperm(args.batch_size, device=batch.obs.device)",
     "batch = batch._replace(logprobs=agent.logprob_entropy_value(batch.obs, batch.actions)[0].detach()); "
     "perm = torch.randperm(args.batch_size, device=batch.obs.device)"),
    ("off-by-one between observations and actions", BOTH,
     "as_tensor(rollout.actions).flatten(0, 1)", "as_tensor(np.roll(rollout.actions, 1, axis=0)).flatten(0, 1)"),
    ("gamma ignored (1)", BOTH, "gamma=gamma, gae_lambda=gae_lambda)", "gamma=1.0, gae_lambda=gae_lambda)"),
    ("gamma ignored (0)", BOTH, "gamma=gamma, gae_lambda=gae_lambda)", "gamma=0.0, gae_lambda=gae_lambda)"),
    ("GAE lambda ignored (1)", BOTH, "gamma=gamma, gae_lambda=gae_lambda)", "gamma=gamma, gae_lambda=1.0)"),
    ("train passes lambda 1", BOTH, "gae_lambda=args.gae_lambda)", "gae_lambda=1.0)"),
    ("ratio clip removed", BOTH,
     "-advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)", "-advantages * ratio"),
    ("ratio clip the wrong way (min of the negatives)", BOTH,
     "torch.max(-advantages * ratio,", "torch.min(-advantages * ratio,"),
    ("entropy sign flipped", BOTH,
     "loss = pg_loss - ent_coef * entropy_loss", "loss = pg_loss + ent_coef * entropy_loss"),
    ("value loss sign flipped", BOTH, "+ vf_coef * v_loss", "- vf_coef * v_loss"),
    ("value clipping always on", BOTH, "if clip_vloss:", "if True:"),
    ("no advantage normalization when on", BOTH, "if args.norm_adv:  # per minibatch", "if False:  # per minibatch"),
    ("next_obs is the reset observation, not final_obs", BOTH,
     'rollout.next_obs[step, ended] = np.stack(infos["final_obs"][ended])', "pass"),
    ("no shuffling", BOTH,
     "perm = torch.randperm(args.batch_size, device=batch.obs.device)",
     "perm = torch.arange(args.batch_size, device=batch.obs.device)"),
    ("one epoch only", BOTH, "for epoch in range(args.update_epochs):", "for epoch in range(1):"),
    ("target-kl test the wrong way", BOTH,
     'parts["approx_kl"].item() > args.target_kl', 'parts["approx_kl"].item() < args.target_kl'),
    ("lr annealed one iteration early", BOTH,
     "(1.0 - global_step / last_step if args.anneal_lr else 1.0)",
     "(1.0 - (global_step + args.batch_size) / last_step if args.anneal_lr else 1.0)"),
    ("lr never annealed", BOTH,
     "(1.0 - global_step / last_step if args.anneal_lr else 1.0)", "1.0"),
    ("lr schedule computed but not applied", BOTH,
     'optimizer.param_groups[0]["lr"].fill_(lr)', "pass"),
    ("one iteration past total_timesteps", BOTH,
     "// args.batch_size * args.batch_size", "// args.batch_size * args.batch_size + args.batch_size"),
    ("a time-limit cut not reported as truncated", BOTH,
     "bool(truncated[i] and not terminated[i])", "False"),
    ("reward scaler does not divide", CONT,
     "np.clip(rewards / float(torch.sqrt(self.return_rms.var + 1e-8)), -10.0, 10.0)", "np.clip(rewards, -10.0, 10.0)"),
    ("reward scaler does not clip", CONT,
     "np.clip(rewards / float(torch.sqrt(self.return_rms.var + 1e-8)), -10.0, 10.0)",
     "(rewards / float(torch.sqrt(self.return_rms.var + 1e-8)))"),
    ("discounted return never restarts after an episode's end", CONT,
     "np.where(dones[t] == 1, 0.0, self.discounted_return)", "self.discounted_return"),
    ("reward statistics not the agent's (lost at a checkpoint)", CONT,
     "RewardScaler(args.num_envs, args.gamma, agent.return_rms)",
     "RewardScaler(args.num_envs, args.gamma, RunningMeanStd(()))"),
    ("obs statistics never updated", CONT,
     "        if args.norm_obs:  # between iterations", "        if False:  # between iterations"),
    ("running variance without the between-batch term", CONT,
     " + delta ** 2 * self.count * n / total", ""),
    ("scaled rewards not used", CONT,
     "batch = make_batch(agent=agent, rollout=rollout, rewards=rewards,",
     "batch = make_batch(agent=agent, rollout=rollout, rewards=rollout.rewards,"),
    ("obs statistics updated before the update", CONT,
     "        losses = update(agent=agent, optimizer=optimizer,",
     "        agent.obs_rms.update(batch.obs)\n        losses = update(agent=agent, optimizer=optimizer,"),
]


def mutated_texts(mutant, pristine):
    """{script: mutated text}, or SystemExit(2) naming the mutant whose pattern is not found once."""
    name, scripts, old, new = mutant
    texts = {}
    for script in scripts:
        count = pristine[script].count(old)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times (it must be exactly once)"
            print(f"\nMUTANT PATTERN {where.upper()}: mutant {name!r}, in {script}:\n  {old!r}\n"
                  "Update the mutant's pattern in tests/mutate.py to the script's current text.", file=sys.stderr)
            raise SystemExit(2)
        texts[script] = pristine[script].replace(old, new)
    return texts


def run_tests(workdir, tests, timeout):
    """(returncode, the first failing test's id or None, seconds)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None, time.perf_counter() - start
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    return result.returncode, failed.group(1) if failed else None, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutant (by name; repeatable)")
    parser.add_argument("--all-tests", action="store_true", help="every test file but the source-text tests")
    parser.add_argument("--tests", nargs="+", help="these test files (or node ids) instead")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated scripts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = parser.parse_args(argv)

    pristine = {s: open(os.path.join(ROOT, s)).read() for s in SCRIPTS}
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m[0] for m in MUTANTS}
        if unknown:
            parser.error(f"no such mutant: {', '.join(sorted(unknown))} (see --list)")
        mutants = [m for m in MUTANTS if m[0] in args.only]
    planned = [(m, mutated_texts(m, pristine)) for m in mutants]  # every pattern checked before any run
    if args.list:
        for (name, scripts, _, _), _ in planned:
            print(f"{name}  [{', '.join(scripts)}]")
        return 0
    if args.tests:
        tests = args.tests
    elif args.all_tests:
        tests = sorted(os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                       if f.startswith("test_") and f.endswith(".py"))
        tests = [t for t in tests if t not in SOURCE_TEXT_TESTS]
    else:
        tests = BEHAVIOUR_TESTS

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        workdir = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.pt", "*.onnx", "videos"))
        if not args.no_baseline:
            code, failed, seconds = run_tests(workdir, tests, args.timeout)
            if code != 0:
                print(f"the unmutated scripts fail ({failed or code}): fix that first", file=sys.stderr)
                return 1
            print(f"baseline: the tests pass unmutated ({seconds:.0f} s)", flush=True)
        rows = []
        for (name, scripts, _, _), texts in planned:
            for script in SCRIPTS:
                with open(os.path.join(workdir, script), "w") as f:
                    f.write(texts.get(script, pristine[script]))
            code, failed, seconds = run_tests(workdir, tests, args.timeout)
            if code == 1 and failed:
                verdict = f"killed by {failed}"
            elif code == 0:
                verdict = "SURVIVED"
            else:  # an import error or a timeout is no test failing on behaviour
                verdict = f"BROKEN (pytest exit {code}{': ' + failed if failed else ''})"
            rows.append((name, verdict, seconds))
            print(f"{name}: {verdict} ({seconds:.0f} s)", flush=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant':<{width}}  result")
    for name, verdict, _ in rows:
        print(f"{name:<{width}}  {verdict}")
    survived = [r for r in rows if not r[1].startswith("killed")]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

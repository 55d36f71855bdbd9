"""The one way the learning tests train in process: change train_for_test when train() changes."""
import torch


def train_for_test(module, args, tmp_path):
    """Train `module` (ppo_discrete or ppo_continuous) with `args` (an Args); the trained agent.

    train() itself writes nothing (logging and checkpoints are the harness's), so tmp_path is
    unused. One torch thread, as main() sets: tiny networks train faster without the sync of a
    second one.
    """
    torch.set_num_threads(1)
    agent, optimizer = module.make_agent_and_optimizer(args)
    module.train(args, agent, optimizer)
    return agent

"""The two scripts repeat each other on purpose: whatever does not depend on the action space
must be the same text in both, so that a fix in one cannot silently miss the other."""
import inspect

from conftest import ppo_continuous, ppo_discrete

# Defined in both, and different because the action space is: each with the reason.
DIFFER = {
    "Args": "other defaults and comments; the continuous flags --log-std-init, --norm-obs, --norm-reward",
    "make_env": "the continuous env clips actions to its bounds (ClipAction)",
    "Agent": "a categorical policy against a Gaussian one with observation normalization",
    "make_agent_and_optimizer": "the Gaussian agent takes an action size, norm_obs and log_std_init",
    "train": "action storage (integers against float vectors), reward scaling, observation statistics",
    "check_env": "which action space is accepted",
}
# Defined in one script only.
ONLY = {
    "ppo_discrete": set(),
    "ppo_continuous": {"RunningMeanStd", "RewardScaler"},
}


def own_names(module):
    """Functions, classes and upper-case constants the module defines itself (not imports)."""
    names = set()
    for name, obj in vars(module).items():
        if name.startswith("_"):  # e.g. the resume functions torch.compile adds to a module it traced
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            if obj.__module__ == module.__name__:
                names.add(name)
        elif name.isupper() and not name.startswith("_"):
            names.add(name)
    return names


def test_every_shared_function_and_class_is_the_same_text():
    shared = own_names(ppo_discrete) & own_names(ppo_continuous)
    checked = [n for n in sorted(shared) if (inspect.isfunction(getattr(ppo_discrete, n))
                                            or inspect.isclass(getattr(ppo_discrete, n))) and n not in DIFFER]
    assert len(checked) >= 22  # the bulk of both files: all but DIFFER, 22 when this was written
    differing = [n for n in checked
                 if inspect.getsource(getattr(ppo_discrete, n)) != inspect.getsource(getattr(ppo_continuous, n))]
    assert differing == [], f"make these the same text, or list them in DIFFER with a reason: {differing}"


def test_the_list_of_differences_is_short_and_true():
    for name in DIFFER:
        a, b = getattr(ppo_discrete, name), getattr(ppo_continuous, name)
        assert inspect.getsource(a) != inspect.getsource(b), f"{name} is the same text now: drop it from DIFFER"


def test_what_only_one_script_defines():
    d, c = own_names(ppo_discrete), own_names(ppo_continuous)
    assert d - c == ONLY["ppo_discrete"]
    assert c - d == ONLY["ppo_continuous"]


def test_constants_that_must_agree():
    constants = {n for n in own_names(ppo_discrete) & own_names(ppo_continuous) if n.isupper()}
    assert constants == {"SCRIPT", "MAY_CHANGE"}  # a new one: say here whether the twins must agree on it
    assert ppo_discrete.MAY_CHANGE == ppo_continuous.MAY_CHANGE
    assert (ppo_discrete.SCRIPT, ppo_continuous.SCRIPT) == ("ppo_discrete", "ppo_continuous")

"""The file reads top to bottom: the algorithm first, the harness last, nothing used before it
is defined, no function longer than 60 lines; and the budget: each script at most 700 lines, the
algorithm (sections 1-7) at most 450, the harness at most 250, train() at most 40, and ppo_loss
called from one place only (gradient_step, the one text of a step, compiled or not)."""
import ast
import inspect
import re

from conftest import SCRIPTS
import pytest


def top_level(module):
    tree = ast.parse(inspect.getsource(module))
    return tree, [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]


def defined_names(node):
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [node.name]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_no_forward_references(module):
    tree, nodes = top_level(module)
    position = {name: i for i, node in enumerate(nodes) for name in defined_names(node)}
    late = []
    for i, node in enumerate(nodes):
        for ref in ast.walk(node):
            if isinstance(ref, ast.Name) and position.get(ref.id, -1) > i:
                late.append(f"{defined_names(node)[0]} uses {ref.id}")
    assert late == []


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_sections_in_reading_order_with_the_harness_last(module):
    source = inspect.getsource(module)
    headings = re.findall(r"^# (\d)\. (.+)$", source, re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 9))
    assert headings[7][1].startswith("The harness")
    harness_start = source.index("# 8. The harness")
    for name in ("Args", "make_env", "Agent", "compute_gae", "ppo_loss", "collect_rollout", "make_batch",
                 "gradient_step", "update", "evaluate", "log_iteration", "train"):
        assert source.index(f"\n{'class' if name[0].isupper() else 'def'} {name}") < harness_start, name
    for name in ("RunArgs", "check_env", "load_checkpoint", "Harness", "run", "main"):
        assert source.index(f"\n{'class' if name[0].isupper() else 'def'} {name}") > harness_start, name


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_no_function_over_60_lines(module):
    tree, _ = top_level(module)
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_the_line_budget(module):
    source = inspect.getsource(module)
    lines = source.splitlines()
    algorithm_start = source.index("\n# 1. ")
    harness_start = source.index("\n# 8. The harness")
    algorithm = source[algorithm_start:harness_start].count("\n")  # from the "# 1." heading to the "# 8." one
    harness = len(lines) - source[:harness_start + 1].count("\n")  # from its heading to the end
    assert len(lines) <= 700
    assert algorithm <= 450, f"sections 1-7 are {algorithm} lines"
    assert harness <= 250, f"the harness is {harness} lines"
    train = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 40


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_ppo_loss_is_called_from_gradient_step_only(module):
    tree, nodes = top_level(module)
    callers = [defined_names(node)[0] for node in nodes for call in ast.walk(node)
               if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "ppo_loss"]
    assert callers == ["gradient_step"]

"""The file reads top to bottom: the algorithm first, the harness last, nothing used before it
is defined, no function longer than 60 lines."""
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
    for name in ("Args", "make_env", "Agent", "compute_gae", "ppo_loss", "collect_rollout", "make_batch", "update",
                 "evaluate", "train"):
        assert source.index(f"\n{'class' if name[0].isupper() else 'def'} {name}") < harness_start, name
    for name in ("RunArgs", "save_checkpoint", "load_checkpoint", "CompiledGradientStep", "main"):
        assert source.index(f"\n{'class' if name[0].isupper() else 'def'} {name}") > harness_start, name


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_no_function_over_60_lines(module):
    tree, _ = top_level(module)
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []

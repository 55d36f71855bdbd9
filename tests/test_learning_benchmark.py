"""benchmark/learning.py reuses a saved run only for the code that made it, and its tables say
only what the runs recorded."""
import json
import os
import sys
from types import SimpleNamespace

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import learning  # noqa: E402


def saved_run(config="default", seed=1, **extra):
    return {"config": config, "flags": ["--env-id", "CartPole-v1"], "seed": seed,
            "total_timesteps": 1000, "eval_every": 1, "final": {"mean": 10.0, "std": 1.0, "global_step": 1000},
            "curve": [(500, 5.0), (1000, 10.0)], "wall": 1.0, "sps": 1000.0, **extra}


def test_a_table_fills_in_nothing_a_run_did_not_record():
    text = learning.recorded([saved_run(), saved_run(seed=2)])
    assert "not recorded" in text and "2026" not in text and "2 run" not in text
    text = learning.recorded([saved_run(date="2026-12-01", jobs=2, at_once=1, code="abc")])
    assert "2026-12-01" in text and "at once 1" in text and "abc" in text


def test_runs_in_flight_are_counted_not_assumed():
    runs = [{"started": 0, "ended": 10}, {"started": 1, "ended": 3}, {"started": 11, "ended": 20}]
    learning.record_overlap(runs)
    assert [r["at_once"] for r in runs] == [2, 2, 1]


def test_a_saved_run_is_reused_only_for_the_code_that_made_it(tmp_path, monkeypatch):
    code = learning.code_version("ppo_discrete")
    saved = [saved_run(seed=1, code=code), saved_run(seed=2, code="older-code"), saved_run(seed=3)]
    (tmp_path / "learning_ppo_discrete_CartPole-v1.json").write_text(json.dumps(saved))
    ran = []
    monkeypatch.setattr(learning, "run_one", lambda *job: ran.append(job[3]) or saved_run(
        seed=job[3], code=job[-1], started=0.0, ended=1.0))
    monkeypatch.setattr(learning, "plot", lambda *a: None)
    opts = SimpleNamespace(out=str(tmp_path), jobs=1, fresh=False, eval_every_steps=1000,
                           runs_dir=str(tmp_path / "runs"))
    learning.run_configs("ppo_discrete", "CartPole-v1", {"default": []}, [1, 2, 3], 1000, opts)
    assert sorted(ran) == [2, 3]  # seed 1 was made by this code; 2 by other code, 3 recorded none
    table = (tmp_path / "learning_ppo_discrete_CartPole-v1.md").read_text()
    assert f"code {code}" in table and "older-code" not in table

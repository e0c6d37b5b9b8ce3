import copy

import pytest
import yaml

from conftest import TINY
from torchslim.auto.planner import pareto
from torchslim.pipeline import run
from torchslim.recipe import load_recipe, parse_recipe


def test_pareto_front_keeps_only_undominated_candidates():
    rows = [
        {"latency_ms": 1.0, "val_accuracy": 0.80},
        {"latency_ms": 2.0, "val_accuracy": 0.90},
        {"latency_ms": 2.5, "val_accuracy": 0.85},
        {"latency_ms": 3.0, "val_accuracy": 0.91},
        {"latency_ms": 0.5, "error": "x"},
    ]
    assert [r["latency_ms"] for r in pareto(rows, "latency_ms")] == [1.0, 2.0, 3.0]


def test_a_spent_time_budget_skips_and_records_the_step():
    from torchslim.auto.planner import Clock

    clock = Clock(budget=0)
    assert not clock.allows("trial 1") and clock.skipped == ["trial 1"]
    assert Clock(budget=3600).allows("trial 1")


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    recipe = copy.deepcopy(TINY)
    recipe["data"].update(train_subset=3000, eval_subset=1000)
    recipe["stages"] = [
        {"train": {"epochs": 3, "lr": 0.003}},
        {
            "auto": {
                "max_accuracy_drop": 0.03,
                "objective": "latency",
                "time_budget_s": 600,
                "prune_ratios": [0.5],
                "energies": [0.8],
                "max_trials": 2,
                "prune_steps": 1,
                "finetune": {"epochs": 1, "lr": 0.001},
            }
        },
        {"export": {"format": "onnx"}},
    ]
    out = tmp_path_factory.mktemp("auto")
    return run(parse_recipe(recipe), out), out


def test_auto_measures_candidates_and_writes_a_plan_that_reruns(auto_run, tmp_path):
    report, out = auto_run
    stage = report["stages"][2]
    info = stage["auto"]
    assert len(info["candidates"]) == 2 * 2 * 2  # prune {0, 0.5} x energy {none, 0.8} x {float, int8}
    assert all(c["latency_ms"] > 0 and c["size_bytes"] > 0 for c in info["candidates"])
    assert {r["layer"] for r in info["sensitivity"]["prune"]} and info["sensitivity"]["int8"]
    assert 1 <= len(info["trials"]) <= 2 and info["time_budget_s"] == 600
    assert stage["notes"][0].startswith("search took ") and stage["notes"][0].endswith("of a 600 s budget")
    assert info["front"] == sorted(info["front"], key=lambda r: r["latency_ms"])
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    if info["chosen_trial"] is not None:
        chosen = info["trials"][info["chosen_trial"]]
        assert chosen["meets_budget"] and chosen["val_drop"] <= info["allowed_val_drop"]
        assert stage["metrics"]["latency_ms"]["p50"] > 0
        assert [next(iter(s)) for s in plan["stages"]][-1] == "export"
    rerun = run(parse_recipe(plan), tmp_path / "rerun")
    assert rerun["status"] == "complete"
    html = (out / "report.html").read_text()
    assert "Planner (stage 2)" in html


def test_auto_cli_builds_a_recipe_from_the_preparing_stages(monkeypatch):
    from typer.testing import CliRunner

    from torchslim import cli

    seen = {}

    def fake_run(recipe, run_dir, **kw):
        seen["stages"] = [s.name for s in recipe.stages]
        seen["auto"] = recipe.stages[-2].config
        raise KeyboardInterrupt

    monkeypatch.setattr("torchslim.pipeline.run", fake_run)
    result = CliRunner().invoke(
        cli.app, ["auto", "prune", "--max-accuracy-drop", "0.005", "--objective", "size", "--time-budget", "120"]
    )
    assert result.exit_code == 130
    assert seen["stages"] == ["train", "auto", "export"]
    assert seen["auto"].objective == "size" and seen["auto"].max_accuracy_drop == 0.005
    assert seen["auto"].time_budget_s == 120
    assert load_recipe("auto")[0].stages[1].name == "auto"


def test_a_budget_too_small_for_the_sensitivity_pass_is_said_up_front(tmp_path):
    """The planner times its first one-layer trial, extrapolates the sensitivity pass, and says when
    that alone would eat the budget, with the budget that would do."""
    recipe = copy.deepcopy(TINY)
    recipe.update(model={"builtin": "cnn_teacher"})
    recipe["data"].update(train_subset=640, eval_subset=200)
    recipe["stages"] = [
        {
            "auto": {
                "time_budget_s": 10,
                "sensitivity_samples": 200,
                "prune_ratios": [0.5],
                "max_trials": 1,
                "finetune": {"epochs": 1, "lr": 0.001},
            }
        }
    ]
    report = run(parse_recipe(recipe), tmp_path)
    auto = report["stages"][1]
    said = " ".join(auto.get("warnings", []))
    assert "the sensitivity pass alone needs about" in said and "--time-budget" in said, auto.get("warnings")
    needed = auto["auto"]["sensitivity"]["estimated_sensitivity_s"]
    assert needed > 5 and f"--time-budget {max(3 * needed, 600):.0f}" in said

"""A task that is neither classification nor embedding, from an entry point, with a user stage from a
recipe's `plugins:` — the example in examples/box_regression, run from the CLI as a user would."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from torchslim.cli import app
from torchslim.errors import RecipeError
from torchslim.recipe import parse_recipe
from torchslim.registry import get_stage

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "box_regression"


@pytest.fixture()
def example(tmp_path):
    folder = tmp_path / "box"
    shutil.copytree(EXAMPLE, folder)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["data"]["kwargs"] = {"train": 1500, "test": 400}
    recipe["measure"].update(repeats=5, warmup=1, compare_seconds=1, verify_samples=64)
    recipe["stages"][0]["train"]["epochs"] = 4
    recipe["stages"][2]["prune"]["finetune"]["epochs"] = 1
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def _cli(args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_user_task_runs_prune_quantize_export_with_its_own_metric(example, tmp_path):
    run = tmp_path / "run"
    code, text = _cli(["run", example / "recipe.yaml", "--out", run])
    assert code == 0, text
    report = json.loads((run / "report.json").read_text())
    assert report["task_metric"] == "mae" and report["task_metric_higher_is_better"] is False
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["baseline", "train", "clip_outliers", "prune", "quantize", "export"]
    m = {s["name"]: s["metrics"] for s in stages}
    # the metric is the task's own, from the served ONNX artifact: far below a constant predictor's
    import sys

    sys.path.insert(0, str(example))
    try:
        import boxes

        targets = boxes.data(1500, 400)["test"].tensors[1].numpy()
    finally:
        sys.path.remove(str(example))
    constant = float(np.abs(targets - targets.mean(0)).mean())
    assert m["train"]["mae"] < 0.5 * constant and m["baseline"]["mae"] > m["train"]["mae"]
    assert m["export"]["mae"] < constant and "rmse" in m["export"]
    assert isinstance(stages[2]["clipped_weights"], int)  # the plugin stage ran and reported
    assert m["prune"]["params"] < 0.5 * m["train"]["params"]  # channels removed from the tensors
    assert stages[4]["result"] == "lowered" and stages[4]["artifact"].endswith(".onnx")
    assert m["quantize"]["kernels"]["integer"] > 0 and m["quantize"]["size_bytes"] < 0.5 * m["prune"]["size_bytes"]
    scheme = stages[4]["quantization"]["scheme"]  # schemes scored by the task's metric (negated MAE)
    assert all(-1 < r["val_accuracy"] < 0 for r in scheme["candidates"])
    assert report["summary"]["mae_drop"] == pytest.approx(m["export"]["mae"] - m["clip_outliers"]["mae"])
    html = (run / "report.html").read_text()
    assert "mae" in html and "lower is better" in html
    # resumed after the pruning stage: the pruned model is rebuilt from its saved shapes and finishes the same
    state = json.loads((run / "state.json").read_text())
    state["stages"], state["status"] = state["stages"][:4], "running"
    (run / "state.json").write_text(json.dumps(state))
    code, text = _cli(["run", example / "recipe.yaml", "--out", run, "--resume"])
    assert code == 0, text
    again = json.loads((run / "report.json").read_text())["stages"]
    assert again[4]["metrics"]["params"] == m["quantize"]["params"]
    assert again[4]["metrics"]["mae"] == pytest.approx(m["quantize"]["mae"], abs=2e-3)


def test_plugin_and_task_errors_say_what_to_do(example):
    recipe = yaml.safe_load((example / "recipe.yaml").read_text())
    with pytest.raises(RecipeError, match="unknown stage 'no_such_stage'.*plugins:"):
        parse_recipe({**recipe, "stages": [{"no_such_stage": {}}]}, "recipe", example)
    with pytest.raises(RecipeError, match="plugins: cannot import 'nothere'"):
        parse_recipe({**recipe, "plugins": ["nothere"]}, "recipe", example)
    with pytest.raises(RecipeError, match="not a subclass of torchslim.tasks.Task"):
        parse_recipe({**recipe, "task": {"entrypoint": "boxes:build"}}, "recipe", example)
    with pytest.raises(RecipeError, match="unknown task 'regresion'"):
        parse_recipe({**recipe, "task": "regresion"}, "recipe", example)
    parsed = parse_recipe(recipe, "recipe", example)
    assert parsed.stages[1].name == "clip_outliers" and parsed.stages[1].config.sigmas == 4


def test_the_same_plugin_from_two_recipe_folders_in_one_process(tmp_path):
    """Two recipes, each with its own boxes.py: the second recipe's file is the one imported, and its
    stages and task replace the first's instead of failing as registered twice."""
    recipes = []
    for name, sigmas in (("a", 4), ("b", 7)):
        folder = tmp_path / name
        shutil.copytree(EXAMPLE, folder)
        source = (folder / "boxes.py").read_text()
        (folder / "boxes.py").write_text(source + f"\nFOLDER = {name!r}\n")
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        recipe["stages"][1]["clip_outliers"] = {"sigmas": sigmas}
        recipes.append((folder, recipe))
    for folder, recipe in recipes:
        parsed = parse_recipe(recipe, "recipe", folder)
        assert sys.modules["boxes"].FOLDER == folder.name
        assert parsed.stages[1].config.sigmas == recipe["stages"][1]["clip_outliers"]["sigmas"]
        assert get_stage("clip_outliers").apply.__globals__["FOLDER"] == folder.name

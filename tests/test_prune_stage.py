import copy
import json

import pytest

from conftest import assert_resume_matches
from torchslim.errors import RecipeError
from torchslim.pipeline import run
from torchslim.recipe import load_recipe, parse_recipe


def _recipe(tiny_recipe, *stages):
    tiny_recipe["model"] = {"builtin": "cnn_student"}
    tiny_recipe["data"].update(train_subset=1024, eval_subset=200)
    tiny_recipe["stages"] = [{"train": {"epochs": 2, "lr": 0.003}}, *stages, {"export": {"format": "all"}}]
    return parse_recipe(tiny_recipe)


STRUCTURED = {
    "prune": {
        "method": "structured",
        "ratio": 0.5,
        "schedule": {"kind": "gradual", "steps": 2},
        "finetune": {"epochs": 1, "lr": 0.001},
    }
}


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory):
    """One uninterrupted run of the structured gradual recipe: the report test and the resume test's
    reference."""
    from conftest import TINY

    out = tmp_path_factory.mktemp("structured")
    return run(_recipe(copy.deepcopy(TINY), STRUCTURED), out), out


def test_structured_gradual_stage_shrinks_and_reports(structured_run):
    report, tmp_path = structured_run
    trained, pruned = report["stages"][1]["metrics"], report["stages"][2]["metrics"]
    assert pruned["params"] < 0.35 * trained["params"]
    assert pruned["size_bytes"] < 0.4 * trained["size_bytes"]
    assert pruned["flops"] < 0.4 * trained["flops"]
    stage = report["stages"][2]
    assert [s["step"] for s in stage["steps"]] == [1, 2]
    assert stage["steps"][0]["target"] == pytest.approx(0.5 - 0.5 * 0.5**3)
    assert {"layer": "features.0", "before": 32, "after": 16, "sparsity": 0.5} in stage["layers"]
    assert report["summary"]["reference_stage"] == "train" and report["summary"]["param_ratio"] > 2.8
    html = (tmp_path / "report.html").read_text()
    assert "Per-layer sparsity" in html and "Sparsity over pruning steps" in html


def test_unstructured_stage_stores_sparsely(tmp_path, tiny_recipe):
    report = run(_recipe(tiny_recipe, {"prune": {"method": "magnitude", "sparsity": 0.9}}), tmp_path)
    m = report["stages"][2]["metrics"]
    assert m["nonzero_params"] < 0.15 * m["params"]
    assert m["storage_bytes"] == m["sparse_bytes"] <= 0.25 * m["weights_bytes"]
    assert report["stages"][2]["note"].startswith("Unstructured sparsity shrinks")
    assert report["summary"]["storage_ratio"] > 4


def test_prune_stage_resumes_to_the_same_weights(tmp_path, tiny_recipe, structured_run):
    recipe = _recipe(tiny_recipe, STRUCTURED)
    # train epochs 1, 2, then the first prune step's fine-tuning epoch
    assert_resume_matches(recipe, tmp_path, 3, "stages/03-export/model.safetensors", full=structured_run[1])


def test_prune_config_errors(tiny_recipe):
    tiny_recipe["stages"] = [{"prune": {"method": "structured"}}]
    with pytest.raises(RecipeError, match="needs 'ratio'"):
        parse_recipe(tiny_recipe)
    tiny_recipe["stages"] = [{"prune": {"method": "magnitude", "sparsity": 1.5}}]
    with pytest.raises(RecipeError, match="stages\\[0\\].prune.sparsity"):
        parse_recipe(tiny_recipe)


def test_builtin_prune_recipe_is_valid():
    recipe, _ = load_recipe("prune")
    names = [s.name for s in recipe.stages]
    assert names[0] == "train" and "prune" in names and names[-1] == "export"
    prune = next(s.config for s in recipe.stages if s.name == "prune")
    assert prune.method == "structured" and prune.schedule.kind == "gradual" and prune.finetune is not None


def test_taylor_importance_in_a_recipe(tmp_path, tiny_recipe):
    stage = {"prune": {"method": "structured", "ratio": 0.25, "importance": "taylor"}}
    report = run(_recipe(tiny_recipe, stage), tmp_path)
    assert report["stages"][2]["metrics"]["params"] < report["stages"][1]["metrics"]["params"]
    assert "Per-layer pruning" in (tmp_path / "report.html").read_text()


def test_unstructured_stage_leaves_no_gradient_hooks(tmp_path, tiny_recipe):
    """Masks hold during the stage's fine-tuning only; a later train stage may update every weight."""
    stage = {"prune": {"method": "magnitude", "sparsity": 0.5, "finetune": {"epochs": 1, "lr": 0.001}}}
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "lr": 0.003}}, stage, {"train": {"epochs": 1, "lr": 0.003}}]
    tiny_recipe["data"].update(train_subset=512, eval_subset=100)
    report = run(parse_recipe(tiny_recipe), tmp_path)
    pruned, retrained = report["stages"][2]["metrics"], report["stages"][3]["metrics"]
    assert pruned["nonzero_params"] < 0.6 * pruned["params"]
    assert retrained["nonzero_params"] > 0.95 * retrained["params"]  # zeros were free to move again


ODD_MODEL = """import torch
from torch import nn


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.cat([torch.atan(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(y.mean((2, 3)))


def build():
    return Odd()
"""


def test_cli_and_html_say_which_op_and_line_kept_a_group(tmp_path, tiny_recipe, capsys, monkeypatch):
    import sys

    import yaml

    from torchslim import cli

    (tmp_path / "odd_model.py").write_text(ODD_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_recipe["model"] = {"entrypoint": "odd_model:build"}
    tiny_recipe["data"].update(train_subset=256, eval_subset=100)
    tiny_recipe["stages"] = [{"train": {"epochs": 1}}, {"prune": {"method": "structured", "ratio": 0.5, "round_to": 1}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    monkeypatch.setattr(sys, "argv", ["torchslim", "run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    text = capsys.readouterr()
    text = text.out + text.err
    assert info.value.code in (0, None), text
    assert "2 kept whole" in text and "atan" in text and "odd_model.py:12 `y = torch.cat([torch.atan" in text, text
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["layer"]: r for r in report["stages"][2]["layers"]}
    assert rows["b"]["after"] == 8 and rows["a"]["after"] == 16
    assert "atan" in rows["a"]["why_kept"] and "odd_model.py:12" in rows["a"]["why_kept"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "why kept" in html and "atan" in html

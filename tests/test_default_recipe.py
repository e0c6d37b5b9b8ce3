"""The acceptance run of the built-in default recipe (about 10 minutes on 2 cores, most of it training the
teacher; a second run reuses the cached teacher).

Opt in with TORCHSLIM_SLOW=1, e.g. `TORCHSLIM_SLOW=1 make test PYTEST_ARGS="-k default_recipe"`."""

import json
import os

import pytest

from torchslim.pipeline import run
from torchslim.recipe import load_recipe


@pytest.mark.skipif(os.environ.get("TORCHSLIM_SLOW") != "1", reason="slow: set TORCHSLIM_SLOW=1")
def test_default_recipe_compresses_within_a_point_on_the_full_test_set(tmp_path):
    recipe, _ = load_recipe("default")
    report = run(recipe, tmp_path)
    final, summary = report["stages"][-1]["metrics"], report["summary"]
    assert final["eval_examples"] == 10000
    assert summary["reference_stage"] == "train" and final["accuracy"] >= 0.90
    # the acceptance: at least 4x smaller, 2x faster side by side, within 1 point of the teacher
    assert summary["size_ratio"] >= 4 and summary["accuracy_drop"] <= 0.01
    assert report["comparison"]["shapes"]["batch 32"]["speedup"]["median"] >= 2
    assert final["kernels"]["integer"] > 0 and final["latency_ms"]["runtime"] == "onnxruntime"
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "complete"
    assert (tmp_path / "report.html").stat().st_size > 10_000

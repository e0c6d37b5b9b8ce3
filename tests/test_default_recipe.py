"""The acceptance run of the built-in default recipe (about 6-10 minutes on 2 cores).

Opt in with TORCHSLIM_SLOW=1, e.g. `TORCHSLIM_SLOW=1 make test PYTEST_ARGS="-k default_recipe"`."""

import json
import os

import pytest

from torchslim.pipeline import run
from torchslim.recipe import load_recipe


@pytest.mark.skipif(os.environ.get("TORCHSLIM_SLOW") != "1", reason="slow: set TORCHSLIM_SLOW=1")
def test_default_recipe_reaches_090_on_the_full_test_set(tmp_path):
    recipe, _ = load_recipe("default")
    report = run(recipe, tmp_path)
    final = report["stages"][-1]["metrics"]
    assert final["eval_examples"] == 10000
    assert final["accuracy"] >= 0.90
    assert final["onnx_max_abs_diff"] <= 1e-4 and final["latency_ms"]["runtime"] == "onnxruntime"
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "complete"
    assert (tmp_path / "report.html").stat().st_size > 10_000

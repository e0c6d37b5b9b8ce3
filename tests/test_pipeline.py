import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from torchslim.errors import RunDirError
from torchslim.measure.latency import ort_session
from torchslim.pipeline import run
from torchslim.recipe import parse_recipe

STAGE_KEYS = {"name", "seconds", "metrics", "artifact"}
METRIC_KEYS = {"accuracy", "loss", "params", "nonzero_params", "size_bytes", "flops", "latency_ms"}
LATENCY_KEYS = {"p50", "p95", "batch_size", "runtime", "threads"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY

    out = tmp_path_factory.mktemp("run")
    report = run(parse_recipe(TINY), out)
    return out, report


def test_report_matches_the_contract(tiny_run):
    out, report = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=str))
    assert {"torchslim_version", "recipe", "environment", "stages", "input", "summary"} <= on_disk.keys()
    assert {"torch", "onnxruntime", "threads", "cpu"} <= on_disk["environment"].keys()
    assert [s["name"] for s in on_disk["stages"]] == ["baseline", "train", "export"]
    for stage in on_disk["stages"]:
        assert STAGE_KEYS <= stage.keys()
        assert METRIC_KEYS <= stage["metrics"].keys()
        assert LATENCY_KEYS <= stage["metrics"]["latency_ms"].keys()
        assert stage["metrics"]["latency_ms"]["runtime"] == "onnxruntime"
        assert 0.0 <= stage["metrics"]["accuracy"] <= 1.0
        assert (out / stage["artifact"]).stat().st_size == stage["metrics"]["size_bytes"]
    assert on_disk["input"] == {
        "name": "input",
        "shape": [None, 1, 28, 28],
        "dtype": "float32",
        "pixel_scale": 1 / 255,
        "mean": [0.286],
        "std": [0.353],
    }
    assert {"size_ratio", "speedup", "accuracy_drop"} <= on_disk["summary"].keys()
    assert on_disk["recipe"]["stages"][0]["train"]["optimizer"] == "adamw"  # defaults filled in
    assert on_disk["status"] == "complete"


def test_training_stage_improved_accuracy_and_kept_history(tiny_run):
    _, report = tiny_run
    base, trained = report["stages"][0]["metrics"], report["stages"][1]["metrics"]
    assert base["accuracy"] < 0.3 and trained["accuracy"] > 0.7
    assert len(report["stages"][1]["history"]) == 2


def test_artifact_is_usable_from_the_report_alone(tiny_run):
    """Feed raw test pixels as the report's `input` block says and recompute the accuracy."""
    from torchslim.data import fashion_mnist

    out, report = tiny_run
    spec = report["input"]
    raw = fashion_mnist.load_arrays()
    images = raw["test_images"][:300].astype(np.float32)
    x = ((images * spec["pixel_scale"] - spec["mean"][0]) / spec["std"][0])[:, None]
    session = ort_session(out / report["stages"][-1]["artifact"])
    logits = session.run(None, {spec["name"]: x.astype(spec["dtype"])})[0]
    accuracy = float((logits.argmax(1) == raw["test_labels"][:300]).mean())
    assert abs(accuracy - report["stages"][-1]["metrics"]["accuracy"]) < 1e-6


def test_html_report_is_self_contained(tiny_run):
    out, _ = tiny_run
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # size/latency trade-offs and training curves
    assert "<table>" in html and "baseline" in html and "export" in html
    assert 'src="http' not in html


def test_finished_run_is_not_overwritten_by_accident(tiny_run):
    out, _ = tiny_run
    from conftest import TINY

    before = (out / "report.json").read_text()
    with pytest.raises(RunDirError, match="--overwrite"):
        run(parse_recipe(TINY), out)
    assert (out / "report.json").read_text() == before


def test_foreign_directory_is_refused(tmp_path, tiny_recipe):
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a torchslim run directory"):
        run(parse_recipe(tiny_recipe), tmp_path)
    with pytest.raises(RunDirError, match="Nothing to resume"):
        run(parse_recipe(tiny_recipe), tmp_path / "new", resume=True)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0]["train"]["epochs"] = 3
    recipe = parse_recipe(tiny_recipe)
    full = run(recipe, tmp_path / "full")

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-stage

    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", on_epoch_end=interrupt)
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["status"] == "running" and [s["name"] for s in state["stages"]] == ["baseline"]
    with pytest.raises(RunDirError, match="--resume"):
        run(recipe, tmp_path / "cut")
    resumed = run(recipe, tmp_path / "cut", resume=True)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "stages" / "02-export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "stages" / "02-export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["stages"][-1]["metrics"]["accuracy"] == full["stages"][-1]["metrics"]["accuracy"]
    assert [h["loss"] for h in resumed["stages"][1]["history"]] == [h["loss"] for h in full["stages"][1]["history"]]


def test_model_data_shape_mismatch_is_named(tmp_path, tiny_recipe):
    from torchslim.errors import DataError

    tiny_recipe["model"] = {"builtin": "mlp_student", "kwargs": {"num_classes": 7}}
    with pytest.raises(DataError, match=r"returns shape \[2, 7\] but the data has 10 classes"):
        run(parse_recipe(tiny_recipe), tmp_path / "x")
    tiny_recipe["model"] = {"builtin": "mlp_student", "kwargs": {"in_features": 100}}
    with pytest.raises(DataError, match=r"cannot take the data's input of shape \[2, 1, 28, 28\]"):
        run(parse_recipe(tiny_recipe), tmp_path / "y")


def test_user_model_entrypoint_with_checkpoint(tmp_path, tiny_recipe):
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def build(hidden=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n"
    )
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("mymodel", None)  # another test's (or a docs snippet's) mymodel.py may be imported already
    try:
        import mymodel

        torch.manual_seed(3)
        source = mymodel.build(16)
        torch.save(source.state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
    tiny_recipe["model"] = {"entrypoint": "mymodel:build", "kwargs": {"hidden": 16}, "checkpoint": "w.pt"}
    tiny_recipe["stages"] = []
    report = run(parse_recipe(tiny_recipe), tmp_path / "run", search_dir=tmp_path)
    assert report["stages"][0]["metrics"]["params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert (tmp_path / "w.pt").exists()  # the input checkpoint is left alone


def test_cli_smoke_recipe_and_analyze(tmp_path, cli_env):
    result = subprocess.run(
        [sys.executable, "-m", "torchslim", "run", "smoke", "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "train", "export"]
    assert report["stages"][-1]["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert {"model.onnx", "model.safetensors", "input.json"} <= {
        p.name for p in (tmp_path / "s/stages/02-export").iterdir()
    }
    assert "no compressing stage" in result.stdout and "report.json" in result.stdout
    analyze = subprocess.run(
        [sys.executable, "-m", "torchslim", "analyze", "smoke", "--model", "cnn_student"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=600,
    )
    assert analyze.returncode == 0, analyze.stderr[-2000:]
    assert "features.0" in analyze.stdout and "147,754" in analyze.stdout and "onnxruntime" in analyze.stdout


def test_ctrl_c_leaves_a_resumable_run(tmp_path, tiny_recipe, cli_env):
    """A real SIGINT to the CLI mid-training: exit 130 with the resume command, then --resume finishes."""
    import signal
    import time

    tiny_recipe.update(model={"builtin": "cnn_student"})
    tiny_recipe["data"].update(train_subset=512, eval_subset=128)
    tiny_recipe["stages"][0]["train"]["epochs"] = 4
    path, out = tmp_path / "r.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(tiny_recipe))
    cmd = [sys.executable, "-m", "torchslim", "run", str(path), "--out", str(out)]
    # a shell that starts jobs in the background sets SIGINT to "ignore", and Python keeps that; give
    # the CLI the default disposition, as an interactive terminal would
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = out / "stages" / "01-train" / "checkpoint" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert json.loads((out / "state.json").read_text())["status"] == "running"
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=cli_env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and [h["epoch"] for h in report["stages"][1]["history"]] == [1, 2, 3, 4]


def test_a_preset_runs_after_the_recipes_own_stages(tmp_path, tiny_recipe):
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "lr": 0.003}}]
    tiny_recipe["preset"] = "mobile"
    tiny_recipe["measure"] = {"warmup": 1, "repeats": 5}
    report = run(parse_recipe(tiny_recipe), tmp_path)
    assert [s["name"] for s in report["stages"]] == ["baseline", "train", "prune", "lowrank", "quantize", "export"]
    final, trained = report["stages"][-1]["metrics"], report["stages"][1]["metrics"]
    assert final["latency_ms"]["batch_size"] == 1 and final["latency_ms"]["repeats"] == 5
    assert final["params"] < 0.5 * trained["params"] and final["size_bytes"] < trained["size_bytes"]
    assert any(r["kind"] == "svd" for r in report["stages"][3]["factorised"])
    assert report["stages"][4]["quantization"]["method"] == "static"  # (300 val images: the budget decides how many)
    assert report["summary"]["reference_stage"] == "train"


def test_control_row_trains_the_reference_as_long_as_the_compressed_model(tmp_path, tiny_recipe):
    """summary.control: the reference model fine-tuned for the epochs the final model had after it, with
    the same settings, measured like a stage; the summary compares the final model with it."""
    tiny_recipe["stages"] = [
        {"train": {"epochs": 1, "lr": 0.003}},
        {
            "prune": {
                "method": "structured",
                "ratio": 0.5,
                "schedule": {"kind": "steps", "steps": 2},
                "finetune": {"epochs": 1, "lr": 0.002},
            }
        },
    ]
    tiny_recipe["summary"] = {"control": True}
    report = run(parse_recipe(tiny_recipe), tmp_path)
    control, summary = report["control"], report["summary"]
    assert summary["epochs_after_reference"] == 2 and control["epochs"] == 2 and len(control["history"]) == 2
    assert control["train"]["lr"] == 0.002 and control["reference_stage"] == "train"
    reference = report["stages"][1]["metrics"]
    assert control["metrics"]["params"] == reference["params"] > report["stages"][2]["metrics"]["params"]
    assert summary["accuracy_vs_control"] == pytest.approx(
        report["stages"][-1]["metrics"]["accuracy"] - control["metrics"]["accuracy"]
    )
    assert (tmp_path / control["artifact"]).exists() and control["artifact"].startswith("control/")

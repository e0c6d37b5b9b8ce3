"""Faults: a run killed with SIGKILL in the middle of a training stage resumes to the same result."""

import json
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from torchslim.pipeline import run
from torchslim.recipe import parse_recipe


def test_sigkill_during_training_resumes_to_the_same_weights_and_metrics(tmp_path, tiny_recipe, cli_env):
    tiny_recipe.update(model={"builtin": "cnn_student"})
    tiny_recipe["data"].update(train_subset=768, eval_subset=128)
    tiny_recipe["stages"] = [{"train": {"epochs": 4, "lr": 0.003}}, {"export": {"format": "onnx"}}]
    reference = run(parse_recipe(tiny_recipe), tmp_path / "uninterrupted")

    path, out = tmp_path / "r.yaml", tmp_path / "killed"
    path.write_text(yaml.safe_dump(tiny_recipe))
    cmd = [sys.executable, "-m", "torchslim", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env)
    checkpoint = out / "stages" / "01-train" / "checkpoint" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever is on disk now is what resume gets
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "running" and [s["name"] for s in state["stages"]] == ["baseline"]
    assert not (out / "report.html").exists()  # nothing that looks finished
    for written in out.rglob("*.json"):  # written to a temporary name and renamed: never half a file
        json.loads(written.read_text())

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=cli_env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed after epoch" in done.stderr + done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    assert [h["epoch"] for h in report["stages"][1]["history"]] == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "uninterrupted" / "stages" / "01-train" / "model.safetensors"))
    b = load_file(str(out / "stages" / "01-train" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for got, want in zip(report["stages"], reference["stages"]):
        assert got["metrics"]["accuracy"] == want["metrics"]["accuracy"]
        assert got["metrics"].get("loss") == want["metrics"].get("loss")

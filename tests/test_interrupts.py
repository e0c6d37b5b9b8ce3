"""Interrupt anywhere, resume always; one run per folder; a disk that fills up.

One short run (train 3 epochs -> structured prune -> static int8 -> export) is cut at 12 points, from
set-up to the report, with SIGINT (in this process: the CLI's Ctrl-C path) and with SIGKILL (a child
process: no handler runs, whatever is on disk is what resume gets). Each cut is resumed with the
command the interrupt message printed (SIGINT) or `--resume` (SIGKILL), and the chain of cuts ends in
a finished run with the uninterrupted run's weights, int8 artifact and metrics."""

import errno
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from torchslim import cli
from torchslim.errors import RunDirError, os_error_message
from torchslim.lock import LOCK, acquire, release
from torchslim.pipeline import run
from torchslim.recipe import parse_recipe

TESTS = Path(__file__).parent

# (module, function, before/after the call): the first call of each in a process is a cut; in
# order, so every resumed process gets further than the one before
POINTS = [
    ("torchslim.pipeline", "make_task", "before"),  # set-up, before the model exists
    ("torchslim.pipeline", "_measured", "before"),  # measuring the baseline
    ("torchslim.train", "_atomic_save", "after"),  # epoch 1 of training checkpointed
    ("torchslim.train", "_atomic_save", "after"),  # epoch 2 checkpointed
    ("torchslim.pipeline", "_measured", "before"),  # training done, not yet measured or recorded
    ("torchslim.prune.stage", "apply_plan", "before"),  # inside the pruning stage
    ("torchslim.pipeline", "write_json", "before"),  # pruned and measured, state not yet written
    ("torchslim.quantize.lower", "static_int8", "after"),  # inside quantization: one int8 graph written
    ("torchslim.pipeline", "_compare", "before"),  # every stage done: the side-by-side timing
    ("torchslim.pipeline", "build_report", "before"),  # the final report
    ("torchslim.report.html", "write_html", "before"),  # report.json written, report.html not
    ("torchslim.pipeline", "write_json", "after"),  # report.json rewritten, state not yet 'complete'
]
STAGES = ["baseline", "train", "prune", "quantize", "export"]


@pytest.fixture(scope="module")
def recipe():
    return {
        "name": "cuts",
        "seed": 0,
        "model": {"builtin": "mlp_student"},
        "data": {"builtin": "fashion_mnist", "batch_size": 64, "train_subset": 512, "eval_subset": 128},
        "task": "classification",
        "measure": {"batch_size": 8, "threads": 1, "warmup": 1, "repeats": 3, "compare_seconds": 0.3},
        "stages": [
            {"train": {"epochs": 3, "lr": 0.003}},
            {"prune": {"ratio": 0.3}},
            {
                "quantize": {
                    "method": "static",
                    "activation_type": "uint8",
                    "calibration_batches": 2,
                    "max_accuracy_drop": 0.5,
                }
            },
            {"export": {"format": "onnx"}},
        ],
    }


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuts") / "straight"
    run(parse_recipe(recipe), out)
    return out


def _same_result(a: Path, b: Path) -> None:
    """The two finished runs hold the same weights, int8 artifact and metrics (latency aside)."""
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert rb["status"] == "complete" and [s["name"] for s in rb["stages"]] == STAGES
    assert json.loads((b / "state.json").read_text())["status"] == "complete"
    assert (b / "report.html").exists() and not (b / LOCK).exists()
    for sa, sb in zip(ra["stages"], rb["stages"]):
        for key in ("accuracy", "loss", "params", "size_bytes"):
            assert sa["metrics"].get(key) == sb["metrics"].get(key), (sb["name"], key)
    assert [h["epoch"] for h in rb["stages"][1]["history"]] == [1, 2, 3]
    for stage in ("01-train", "02-prune"):
        wa, wb = (load_file(str(d / "stages" / stage / "model.safetensors")) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), stage
    qa, qb = (onnx.load(str(d / rb["stages"][3]["artifact"])) for d in (a, b))
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in qa.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in qb.graph.initializer}
    assert ia.keys() == ib.keys() and all((ia[k] == ib[k]).all() for k in ia)
    assert sum(n.op_type in ("QLinearMatMul", "MatMulInteger", "QuantizeLinear") for n in qb.graph.node) > 0


def _nothing_torn(out: Path) -> None:
    """After a cut: every JSON file parses (atomic writes), and nothing looks finished."""
    for written in out.rglob("*.json"):
        json.loads(written.read_text())
    state = json.loads((out / "state.json").read_text())
    if state["status"] != "complete":
        assert not (out / "report.html").exists()


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["torchslim", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def test_sigint_at_twelve_points_resumes_with_the_printed_command(recipe, uninterrupted, tmp_path, capsys, monkeypatch):
    from fault_driver import inject

    path, out = tmp_path / "cuts.yaml", tmp_path / "cut by ctrl-c"
    path.write_text(yaml.safe_dump(recipe))
    args = ["run", path, "--out", out]
    for module, name, when in POINTS:
        with monkeypatch.context() as patch:
            target = importlib.import_module(module)
            patch.setattr(target, name, getattr(target, name))  # put back when the block ends
            inject(f"{module}:{name}:SIGINT:{when}")
            code, text = _cli(args, capsys, monkeypatch)
        assert code == 130, (module, name, text[-2000:])
        command = re.search(r"continue with: (.+)", text).group(1)
        assert "Traceback" not in text and command.startswith("torchslim run ") and command.endswith(" --resume")
        _nothing_torn(out)
        args = shlex.split(command)[1:]  # the next cut happens in the run this command resumes
    code, text = _cli(args, capsys, monkeypatch)
    assert code in (0, None), text[-2000:]
    _same_result(uninterrupted, out)


def test_sigkill_at_twelve_points_resumes_to_the_same_result(recipe, uninterrupted, tmp_path, cli_env):
    path, out = tmp_path / "cuts.yaml", tmp_path / "killed"
    path.write_text(yaml.safe_dump(recipe))
    base = [sys.executable, str(TESTS / "fault_driver.py"), "run", str(path), "--out", str(out)]
    for i, (module, name, when) in enumerate(POINTS):
        env = {**cli_env, "TORCHSLIM_TEST_FAULT": f"{module}:{name}:SIGKILL:{when}"}
        done = subprocess.run(base + (["--resume"] if i else []), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, (module, name, done.stderr[-2000:])
        _nothing_torn(out)
        assert (out / LOCK).exists()  # left behind by the killed process: the next run takes it over
        state = json.loads((out / "state.json").read_text())
        assert state["status"] == "running" and not (out / "report.html").exists()
        if i in (2, 3):  # killed after an epoch's checkpoint: the training stage is not finished
            assert [s["name"] for s in state["stages"]] == ["baseline"]
        if i == 3:  # the process killed after epoch 2 resumed training from epoch 1's checkpoint
            assert "resumed after epoch 1" in done.stderr, done.stderr[-2000:]
    done = subprocess.run(base + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_result(uninterrupted, out)


# ------------------------------------------------------------------------------- one run per folder


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_pid_and_host(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(RunDirError) as info:
            run(parse_recipe(tiny_recipe), out)
        message = str(info.value)
        assert f"PID {holder.pid}" in message and socket.gethostname() in message and "--out" in message
        assert not (out / "state.json").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_started_at_once_one_is_refused(tiny_recipe, tmp_path, cli_env):
    tiny_recipe["stages"][0]["train"]["epochs"] = 6
    path, out = tmp_path / "r.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(tiny_recipe))
    first = subprocess.Popen(
        [sys.executable, "-m", "torchslim", "run", str(path), "--out", str(out)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "state.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "torchslim", "run", str(path), "--out", str(out), "--resume"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None  # the first run is untouched and goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()
    (tmp_path / LOCK).write_text('{"pid": 1')  # half-written by a process killed while taking it
    release(acquire(tmp_path))
    # a PID that is alive but belongs to a process started after the lock was taken: reused, stale
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": 1}))
    release(acquire(tmp_path))


# ------------------------------------------------------------------------------------------ resources


def test_a_disk_that_fills_mid_write_leaves_a_resumable_run(tiny_recipe, tmp_path, cli_env):
    tiny_recipe["model"] = {"builtin": "cnn_student"}
    tiny_recipe["data"].update(train_subset=256, eval_subset=64)
    tiny_recipe["stages"] = [{"train": {"epochs": 2, "lr": 0.003}}, {"export": {"format": "onnx"}}]
    path, out = tmp_path / "r.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(tiny_recipe))
    cmd = [sys.executable, str(TESTS / "fault_driver.py"), "run", str(path), "--out", str(out)]
    # every file this process writes is cut at 2.5x the model's weights: the baseline's model files
    # fit, the training checkpoint (weights, optimizer moments, best weights) does not
    from torchslim.models import cnn_student

    weights = sum(t.numel() * t.element_size() for t in cnn_student().state_dict().values())
    limit = str(int(2.5 * weights))
    full = subprocess.run(cmd, env={**cli_env, "TORCHSLIM_TEST_FSIZE": limit}, capture_output=True, text=True)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "A file grew past the largest size allowed" in full.stderr and "ulimit -f" in full.stderr
    assert "Traceback" not in full.stderr
    command = re.search(r"continue with: (.+)", full.stderr).group(1)
    assert command.endswith(f"--out {out} --resume"), command
    assert not list(out.rglob("*.tmp")), "a torn temporary file was left behind"
    state = json.loads((out / "state.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["baseline"] and "stage 1: train" in full.stderr
    for written in out.rglob("*.json"):
        json.loads(written.read_text())
    assert not (out / LOCK).exists()  # released on the way out
    done = subprocess.run(cmd + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def test_a_read_only_folder_and_a_missing_data_folder_get_their_own_messages(
    tiny_recipe, tmp_path, capsys, monkeypatch
):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        code, text = _cli(["run", path, "--out", locked / "run"], capsys, monkeypatch)
        assert code == 2 and "Cannot write to the output directory" in text and "--out" in text
    finally:
        locked.chmod(0o700)
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path / "no-such-folder"))
    code, text = _cli(["run", path, "--out", tmp_path / "run2"], capsys, monkeypatch)
    assert code == 2 and "TORCHSLIM_DATA" in text and "free space" not in text


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, ["disk is full", "Free space", "--resume"]),
        (errno.EDQUOT, ["disk is full"]),
        (errno.EFBIG, ["largest size allowed", "ulimit -f", "--resume"]),
        (errno.EROFS, ["read-only", "another --out", "--resume"]),
        (errno.EACCES, ["read-only or belongs to another user"]),
        (errno.ENOENT, ["does not exist", "TORCHSLIM_DATA"]),
    ],
)
def test_each_file_system_failure_has_its_own_message(code, words):
    text = os_error_message(OSError(code, os.strerror(code), "/data/x"), "torchslim run r.yaml --out o --resume")
    assert "/data/x" in text and all(w in text for w in words), text
    if code == errno.ENOENT:
        assert "free space" not in text.lower() and "permission" not in text.lower()

"""Bad input, through the CLI entry point in-process: every case exits non-zero with a message for a
person that names the problem — never a traceback. Runs that get as far as data use tiny subsets."""

import gzip
import os
import sys

import pytest
import torch
import yaml

from torchslim import cli
from torchslim.data import fashion_mnist

SMALL = {"train_subset": 256, "eval_subset": 64, "batch_size": 64}


def _write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def _run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["torchslim", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def _recipe(tiny_recipe, **updates):
    tiny_recipe["data"].update(SMALL)
    tiny_recipe["stages"][0]["train"]["epochs"] = 1
    for key, value in updates.items():
        tiny_recipe[key] = value
    return tiny_recipe


def _set(path, value):
    def mutate(r):
        target = r
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


# (id, how to break the recipe dict, words the message must contain)
RECIPE_CASES = [
    ("misspelled-stage-key", _set(["stages", 0, "train", "epohcs"], 2), ["stages[0].train.epohcs", "epochs"]),
    ("negative-lr", _set(["stages", 0, "train", "lr"], -1), ["stages[0].train.lr", "greater than 0"]),
    ("zero-epochs", _set(["stages", 0, "train", "epochs"], 0), ["stages[0].train.epochs"]),
    ("epochs-as-text", _set(["stages", 0, "train", "epochs"], "many"), ["epochs", "integer"]),
    ("unknown-stage", lambda r: r["stages"].insert(0, {"distil": {}}), ["unknown stage 'distil'", "distill"]),
    ("stage-not-a-mapping", lambda r: r["stages"].insert(0, 42), ["stages[0]", "one-key mapping"]),
    ("two-keys-in-a-stage", lambda r: r["stages"].insert(0, {"train": {}, "export": {}}), ["one-key mapping"]),
    ("stages-not-a-list", _set(["stages"], "train"), ["stages", "list"]),
    ("unknown-top-level-key", _set(["stagez"], []), ["stagez", "unknown key", "stages"]),
    ("unknown-model", _set(["model"], {"builtin": "resnet9000"}), ["resnet9000", "cnn_teacher"]),
    ("two-model-sources", _set(["model"], {"builtin": "mlp_student", "entrypoint": "a:b"}), ["exactly one"]),
    ("bad-entrypoint-syntax", _set(["model"], {"entrypoint": "not a path"}), ["model.entrypoint", "pattern"]),
    ("unknown-task", _set(["task"], "segmentation"), ["task", "classification"]),
    ("bad-runtime", _set(["measure", "runtime"], "tensorrt"), ["measure.runtime", "onnxruntime"]),
    ("zero-threads", _set(["measure", "threads"], 0), ["measure.threads"]),
    ("batch-size-as-text", _set(["data", "batch_size"], "big"), ["data.batch_size", "integer"]),
    ("unknown-precision", _set(["stages", 0, "train", "precision"], "fp8"), ["precision", "bf16"]),
    ("prune-ratio-too-high", lambda r: r["stages"].insert(1, {"prune": {"ratio": 1.5}}), ["prune", "ratio"]),
    ("unknown-preset", _set(["preset"], "moblie"), ["unknown preset", "mobile"]),
    ("bad-name", _set(["name"], "my run/1"), ["name", "pattern"]),
    ("quantize-unknown-method", lambda r: r["stages"].insert(1, {"quantize": {"method": "int3"}}), ["method"]),
    ("embedding-stage-in-classifier", lambda r: r["stages"].insert(1, {"encoder_quantize": {}}),
     ["works on task embedding"]),
    ("cuda-not-present", _set(["device"], "cuda"), ["cuda", "cpu"]),
]


@pytest.mark.parametrize("case, mutate, words", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(case, mutate, words, tiny_recipe, tmp_path, capsys, monkeypatch):
    if case == "cuda-not-present" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    recipe = _recipe(tiny_recipe)
    mutate(recipe)
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code not in (0, None)
    for word in words:
        assert word in text, text
    assert "Traceback" not in text


def test_malformed_yaml(tmp_path, capsys, monkeypatch):
    code, text = _run_cli(["run", _write(tmp_path, "name: x\nstages: [train: {epochs: 1}\n")], capsys, monkeypatch)
    assert code != 0 and "not valid YAML" in text and "Traceback" not in text


def test_yaml_that_is_not_a_mapping(tmp_path, capsys, monkeypatch):
    code, text = _run_cli(["run", _write(tmp_path, "- just\n- a list\n")], capsys, monkeypatch)
    assert code != 0 and "must be a YAML mapping" in text


def test_missing_recipe_file(tmp_path, capsys, monkeypatch):
    code, text = _run_cli(["run", tmp_path / "nope.yaml"], capsys, monkeypatch)
    assert code != 0 and "does not exist" in text


def test_unknown_builtin_recipe(capsys, monkeypatch):
    code, text = _run_cli(["run", "no-such-recipe"], capsys, monkeypatch)
    assert code != 0 and "Built-in recipes" in text


def test_missing_data_files(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path / "empty"))
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"],
                          capsys, monkeypatch)
    assert code != 0 and "dataset-fashion-mnist" in text and "TORCHSLIM_DATA" in text


def test_corrupt_data_file(tiny_recipe, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in fashion_mnist.FILES.values():
        (data / name).write_bytes((fashion_mnist.DEFAULT_DIR / name).read_bytes())
    target = data / fashion_mnist.FILES["train_images"]
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:1000]))
    monkeypatch.setenv("TORCHSLIM_DATA", str(data))
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"],
                          capsys, monkeypatch)
    assert code != 0 and str(target) in text


@pytest.mark.parametrize("module, layer, words", [
    ("wrong_width", "nn.Linear(100, 10)", ["cannot take the data's input", "[2, 1, 28, 28]"]),
    ("seven_classes", "nn.Linear(784, 7)", ["10 classes", "[2, 7]"]),
])
def test_model_does_not_fit_the_data(module, layer, words, tiny_recipe, tmp_path, capsys, monkeypatch):
    (tmp_path / f"{module}.py").write_text(
        f"from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), {layer})\n")
    recipe = _recipe(tiny_recipe, model={"entrypoint": f"{module}:build"})
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and all(word in text for word in words), text


def test_entrypoint_module_missing(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = _recipe(tiny_recipe, model={"entrypoint": "no_such_module_here:build"})
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "no_such_module_here" in text


def test_checkpoint_of_another_model(tiny_recipe, tmp_path, capsys, monkeypatch):
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    recipe = _recipe(tiny_recipe, model={"builtin": "mlp_student", "checkpoint": str(tmp_path / "other.pt")})
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "other.pt" in text


def _linear_model(tmp_path, module: str, output: str) -> dict:
    """A user model file: a linear classifier whose forward returns `output` (an expression of y)."""
    (tmp_path / f"{module}.py").write_text(
        "from torch import nn\n\nclass M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
        f"    def forward(self, x):\n        y = self.fc(x.flatten(1))\n        return {output}\n\n"
        "def build():\n    return M()\n")
    return {"entrypoint": f"{module}:build"}


def test_nan_loss_stops_with_the_step(tiny_recipe, tmp_path, capsys, monkeypatch):
    # finite in evaluation, NaN once training starts
    model = _linear_model(tmp_path, "unstable", "y * float('nan') if self.training else y")
    recipe = _recipe(tiny_recipe, model=model)
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "The loss became" in text and "at step" in text and "learning rate" in text


def test_untraceable_model_for_onnx(tiny_recipe, tmp_path, capsys, monkeypatch):
    # data-dependent control flow: neither ONNX exporter can capture it
    recipe = _recipe(tiny_recipe, model=_linear_model(tmp_path, "dynamic", "y if float(y.sum()) > 0 else -y"))
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and ("ONNX" in text) and "Traceback" not in text


def test_unwritable_output_directory(tiny_recipe, tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        out = tmp_path / "file-not-dir"
        out.write_text("x")
        target = out / "run"  # a path under a regular file cannot be created, even by root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", target], capsys, monkeypatch)
    assert code != 0 and "Cannot write to the output directory" in text


def test_full_disk_is_a_clear_error(tiny_recipe, tmp_path, capsys, monkeypatch):
    import errno

    from torchslim.report import json as report_json
    original = report_json.atomic_write_text

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(report_json, "atomic_write_text", full)
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"],
                          capsys, monkeypatch)
    monkeypatch.setattr(report_json, "atomic_write_text", original)
    assert code != 0 and "No space left on device" in text and "Traceback" not in text


def test_finished_run_is_not_overwritten(tiny_recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text('{"status": "complete", "recipe_hash": "x", "stages": []}')
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", out], capsys, monkeypatch)
    assert code != 0 and "--overwrite" in text


def test_foreign_directory_is_not_used(tiny_recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", out], capsys, monkeypatch)
    assert code != 0 and "not a torchslim run directory" in text and (out / "thesis.tex").read_text() == "keep me"


def test_resume_without_a_run(tiny_recipe, tmp_path, capsys, monkeypatch):
    code, text = _run_cli(["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "none", "--resume"],
                          capsys, monkeypatch)
    assert code != 0 and "Nothing to resume" in text

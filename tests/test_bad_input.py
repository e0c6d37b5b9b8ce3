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
    (
        "embedding-stage-in-classifier",
        lambda r: r["stages"].insert(1, {"encoder_distill": {"keep_every": 2}}),
        ["keep_every", "unknown key"],
    ),
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
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"], capsys, monkeypatch
    )
    assert code != 0 and "dataset-fashion-mnist" in text and "TORCHSLIM_DATA" in text


def test_corrupt_data_file(tiny_recipe, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in fashion_mnist.FILES.values():
        (data / name).write_bytes((fashion_mnist.DEFAULT_DIR / name).read_bytes())
    target = data / fashion_mnist.FILES["train_images"]
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:1000]))
    monkeypatch.setenv("TORCHSLIM_DATA", str(data))
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"], capsys, monkeypatch
    )
    assert code != 0 and str(target) in text


@pytest.mark.parametrize(
    "module, layer, words",
    [
        ("wrong_width", "nn.Linear(100, 10)", ["cannot take the data's input", "[2, 1, 28, 28]"]),
        ("seven_classes", "nn.Linear(784, 7)", ["10 classes", "[2, 7]"]),
    ],
)
def test_model_does_not_fit_the_data(module, layer, words, tiny_recipe, tmp_path, capsys, monkeypatch):
    (tmp_path / f"{module}.py").write_text(
        f"from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), {layer})\n"
    )
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
        "def build():\n    return M()\n"
    )
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

    from torchslim import io

    original = io.atomic_write_text

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "atomic_write_text", full)
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "run"], capsys, monkeypatch
    )
    monkeypatch.setattr(io, "atomic_write_text", original)
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
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe)), "--out", tmp_path / "none", "--resume"], capsys, monkeypatch
    )
    assert code != 0 and "Nothing to resume" in text


def test_data_dependent_branch_is_refused_naming_the_line(tiny_recipe, tmp_path, capsys, monkeypatch):
    """A branch on tensor values: ONNX would keep one branch. Refused with the file and line, unless the
    recipe asks for the TorchScript tracer explicitly, which warns that the branch is frozen."""
    recipe = _recipe(tiny_recipe, model=_linear_model(tmp_path, "branchy", "y if y.mean() > 0 else -y"))
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in text, text
    assert "depends on the input's values" in text and "branchy.py, line 9" in text and "torch.where" in text
    # the tracer, asked for explicitly, freezes the branch with a warning; the export check, fed batches
    # of several sizes, then finds inputs that take the other branch
    recipe["stages"][-1] = {"export": {"exporter": "torchscript"}}
    code, text = _run_cli(["run", _write(tmp_path, recipe, "ts.yaml"), "--out", tmp_path / "ts"], capsys, monkeypatch)
    assert "turned a traced tensor of M into a Python value at" in text and "branchy.py, line 9" in text, text
    assert code != 0 and "disagrees with PyTorch" in text and "Traceback" not in text, text


def test_export_check_feeds_several_batches(tmp_path):
    """A graph that is right for the example batch only is caught: the check feeds batches of 1, 3, 16
    and 64 inputs and compares each with PyTorch."""
    from torch import nn

    from torchslim.errors import ExportError
    from torchslim.export.onnx import verify_onnx
    from torchslim.measure.latency import ort_session

    class BatchMean(nn.Module):  # an output that depends on the batch's composition
        def forward(self, x):
            return x.flatten(1)[:, :10] - x.mean()

    model = BatchMean()
    data = fashion_mnist.load(eval_subset=100)
    x = data.test.tensors[0]
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model, (x[:4],), str(path), input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "batch"}}
    )
    verify_onnx(model, ort_session(path), x, 1e-4)  # the same formula, per batch: agrees on every batch size

    class Frozen(nn.Module):  # ONNX holds the example batch's mean as a constant
        def forward(self, x):
            return x.flatten(1)[:, :10] - float(x.mean())

    torch.onnx.export(
        Frozen(), (x[:4],), str(path), input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "batch"}}
    )
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        verify_onnx(Frozen(), ort_session(path), x, 1e-4)


@pytest.mark.parametrize("where", ["model", "data"])
def test_misspelled_builder_keyword(where, tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = _recipe(tiny_recipe)
    if where == "model":
        recipe["model"]["kwargs"] = {"widht": 16}
    else:
        (tmp_path / "kwargs_checked_data.py").write_text(
            "from torchslim.data import fashion_mnist\n\ndef build(subset=100):\n"
            "    return fashion_mnist.load(train_subset=subset, eval_subset=subset)\n"
        )
        recipe["data"] = {"entrypoint": "kwargs_checked_data:build", "kwargs": {"subsett": 10}}
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    key = "widht" if where == "model" else "subsett"
    assert code != 0 and "Traceback" not in text and f"{where}.kwargs" in text and key in text, text


def test_preset_given_as_a_list(tiny_recipe, tmp_path, capsys, monkeypatch):
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe, preset=["mobile"])), "--out", tmp_path / "run"],
        capsys,
        monkeypatch,
    )
    assert code != 0 and "preset" in text and "mobile" in text and "Traceback" not in text, text


def test_checkpoint_with_layers_the_model_lacks(tiny_recipe, tmp_path, capsys, monkeypatch):
    from torchslim.models import mlp_teacher
    from torchslim.models.io import save_weights

    save_weights(mlp_teacher(), tmp_path / "teacher.safetensors")
    recipe = _recipe(tiny_recipe, model={"builtin": "mlp_student", "checkpoint": str(tmp_path / "teacher.safetensors")})
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in text and "the model does not have" in text and "network." in text, text


def test_checkpoint_shapes_overriding_kwargs_are_warned_about(tiny_recipe, tmp_path, capsys, monkeypatch):
    from torchslim.models.io import save_weights

    (tmp_path / "wide.py").write_text(
        "from torch import nn\n\ndef build(width=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import wide

    save_weights(wide.build(width=24), tmp_path / "w24.safetensors")
    recipe = _recipe(
        tiny_recipe,
        model={"entrypoint": "wide:build", "kwargs": {"width": 16}, "checkpoint": str(tmp_path / "w24.safetensors")},
    )
    recipe["stages"] = [{"export": {}}]
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code in (0, None) and "other layer shapes than the model built from the recipe" in text, text
    assert "width" in text and "24" in text


def test_pytorch_runtime_with_encoder_quantize_is_a_recipe_error(tmp_path, capsys, monkeypatch):
    from torchslim.recipe import builtin_recipes

    recipe = yaml.safe_load(builtin_recipes()["minilm-int8"].read_text())
    recipe.setdefault("measure", {})["runtime"] = "pytorch"
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in text and "measure.runtime" in text and "onnxruntime" in text, text


def test_unknown_recipe_and_stage_names_get_suggestions(tiny_recipe, tmp_path, capsys, monkeypatch):
    code, text = _run_cli(["run", "defualt"], capsys, monkeypatch)
    assert code != 0 and "Did you mean 'default'" in text
    code, text = _run_cli(
        ["run", _write(tmp_path, _recipe(tiny_recipe, stages=[{"quantise": {}}]))], capsys, monkeypatch
    )
    assert code != 0 and "Did you mean 'quantize'" in text


def test_log_lines_have_no_source_location_and_are_not_wrapped(tiny_recipe, tmp_path, cli_env):
    import subprocess

    recipe = _recipe(tiny_recipe)
    recipe["name"] = "a-recipe-name-long-enough-to-push-the-log-lines-well-past-eighty-columns-in-a-pipe"
    done = subprocess.run(
        [sys.executable, "-m", "torchslim", "run", str(_write(tmp_path, recipe)), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert not any(".py:" in line for line in lines), [line for line in lines if ".py:" in line][:3]
    assert any(len(line) > 100 and "latency p50" in line for line in lines)  # one line, not wrapped at 80


def test_factorised_checkpoint_reloads_in_a_fresh_interpreter(tmp_path):
    import subprocess

    from torchslim.lowrank.factorize import factorize
    from torchslim.models import mlp_teacher
    from torchslim.models.io import save_weights

    torch.manual_seed(0)
    model = mlp_teacher().eval()
    factorize(model, torch.randn(2, 1, 28, 28), rank_ratio=0.25)
    save_weights(model, tmp_path / "low.safetensors")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch, torchslim\nfrom torchslim.models import mlp_teacher\n"
        f"m = torchslim.load_weights(mlp_teacher(), r'{tmp_path / 'low.safetensors'}').eval()\n"
        f"x, y = torch.load(r'{tmp_path / 'x.pt'}'), torch.load(r'{tmp_path / 'y.pt'}')\n"
        "assert (m(x) - y).abs().max() < 1e-5\n"
        "assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in mlp_teacher().parameters())\n"
        "import sys; print(sorted(k for k in sys.modules if k.startswith('torchslim.lowrank')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_analyze_works_on_an_embedding_recipe(capsys, monkeypatch):
    """Every task analyzes through its own model, inputs and metric (once a message, before tasks)."""
    code, text = _run_cli(["analyze", "minilm-int8", "--batch-size", "4"], capsys, monkeypatch)
    assert code in (0, None) and "Traceback" not in text, text
    assert "Linear" in text and "Embedding" in text and "LayerNorm" in text  # the per-layer table
    assert "mean cosine 1.0000" in text and "latency onnxruntime" in text


def test_a_teacher_logit_cache_cut_off_by_a_crash_is_recomputed(tmp_path):
    from torchslim.distill.distiller import teacher_cache
    from torchslim.models import mlp_student

    data = fashion_mnist.load(train_subset=100, eval_subset=10)
    path = tmp_path / "teacher_logits.safetensors"
    path.write_bytes(b"\x00" * 37)  # what a write interrupted half-way leaves
    torch.manual_seed(0)
    teacher = mlp_student().eval()
    logits = teacher_cache(teacher, data.train, path)
    assert logits.shape == (100, 10) and not list(tmp_path.glob("*.tmp"))
    assert torch.equal(teacher_cache(teacher, data.train, path), logits)  # now a whole, reusable file


def test_a_missed_quantization_budget_is_said(tiny_recipe, tmp_path, capsys, monkeypatch):
    """When even every layer back in float cannot meet max_accuracy_drop, the run goes on but says so."""
    from torchslim.quantize import static

    real = static.val_score

    def pessimistic(ctx, path, samples):  # any graph with quantized nodes loses half its accuracy
        acc = real(ctx, path, samples)
        return acc if "float" in str(path) else acc - 0.5

    monkeypatch.setattr(static, "val_score", pessimistic)
    recipe = _recipe(tiny_recipe)
    recipe["stages"] = [
        {"train": {"epochs": 1}},
        {
            "quantize": {
                "activation_type": "uint8",
                "max_accuracy_drop": 0.01,
                "calibration_batches": 1,
                "sensitivity_samples": 100,
            }
        },
    ]
    code, text = _run_cli(["run", _write(tmp_path, recipe), "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code in (0, None) and "the accuracy budget is NOT met" in text, text
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert not report["stages"][2]["quantization"]["budget_met"]
    assert any("NOT met" in w for w in report["stages"][2]["warnings"])


def test_a_missed_encoder_fidelity_target_is_said(tmp_path, monkeypatch):
    from torchslim.quantize import encoder
    from torchslim.train import collect_warnings

    monkeypatch.setattr(encoder, "_worst", lambda *args: 0.5)  # no node choice reaches the target
    collect_warnings()
    _, info = encoder._fallback(
        ["a", "b"], lambda dst, exclude: dst, None, {}, {}, tmp_path / "q.onnx", 0.99, 1, {"method": "dynamic"}
    )
    said = collect_warnings()
    assert not info["target_met"] and info["excluded"] == ["a", "b"]
    assert any("fidelity target is NOT met" in w and "0.5000" in w for w in said), said


def test_a_folder_named_like_a_builtin_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """`torchslim run smoke --out smoke` leaves a folder ./smoke; the next `torchslim run smoke` must
    still mean the built-in recipe, not try to read the folder."""
    from torchslim.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    recipe, _ = load_recipe("smoke")
    assert recipe.name == "smoke"

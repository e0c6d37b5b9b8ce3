"""Runs the recipe's stages in order, measures after each, and writes the report.

The run directory holds `state.json` (what has finished), one folder per stage with its artifacts,
`report.json` and `report.html`. A run that dies resumes from the last finished stage and, inside a
training stage, from its last epoch checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from torchslim import distributed
from torchslim.context import RunContext
from torchslim.data import build_data
from torchslim.errors import DataError, RunDirError, TorchslimError
from torchslim.measure import measure
from torchslim.models.io import build_model, load_weights
from torchslim.recipe import Recipe
from torchslim.registry import get_stage
from torchslim.report.json import build_report, environment, write_json
from torchslim.train import console

STATE = "state.json"
OWNED = ("stages", STATE, "report.json", "report.html")


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> dict | None:
    """Check the output directory against what was asked; returns the saved state when resuming."""
    state_path = run_dir / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if overwrite and not resume:
        for name in OWNED:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        state = None
    elif resume:
        if state is None:
            raise RunDirError(f"Nothing to resume in {run_dir}: it has no {STATE}. Run without --resume.")
        if state["recipe_hash"] != recipe_hash(recipe):
            raise RunDirError(f"{run_dir} holds a run of a different recipe (or the recipe changed since); "
                              "resume with the same recipe, or pass --overwrite to start again.")
    elif state is not None:
        what = "a finished run" if state["status"] == "complete" else "an unfinished run (resume it with --resume)"
        raise RunDirError(f"{run_dir} already holds {what}. Pass --overwrite to replace it, or choose "
                          "another directory with --out.")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} is not empty and is not a torchslim run directory; choose an empty or "
                          "new directory with --out so nothing of yours is overwritten.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"Cannot write to the output directory {run_dir}: {exc.strerror}. "
                          "Choose another with --out.") from None
    return state


def _check_shapes(model: torch.nn.Module, ctx: RunContext) -> None:
    x = ctx.real_batch(2)
    try:
        with torch.inference_mode():
            out = model.eval()(x)
    except Exception as exc:  # any failure here means model and data do not fit together
        raise DataError(f"The model cannot take the data's input of shape {list(x.shape)}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Check model and data in the recipe.") from None
    classes = ctx.data.num_classes
    if ctx.recipe.task == "classification" and classes and (out.dim() != 2 or out.shape[1] != classes):
        raise DataError(f"The model returns shape {list(out.shape)} but the data has {classes} classes; "
                        f"a classifier must return [batch, {classes}].")


def build_architecture(arch: dict, num_classes: int | None, search_dir: Path | None) -> torch.nn.Module:
    """A model from an architecture record: a model spec plus structural operations (kept blocks)."""
    from torchslim.distill.students import apply_keep_blocks
    from torchslim.recipe import ModelSpec
    model = build_model(ModelSpec(**arch["model"]), num_classes, search_dir)
    for op in arch.get("ops", []):
        model = apply_keep_blocks(model, op["keep_blocks"], op["indices"])
    return model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TorchslimError("device: cuda was asked for but no CUDA device is available; use 'cpu' or 'auto'.")
    return torch.device(name)


def _reference_index(recipe: Recipe) -> int:
    """Compression is judged against the model as it stood before the first compressing stage."""
    for i, stage in enumerate(recipe.stages):
        if get_stage(stage.name).compresses:
            return i  # entry i is the stage just before stage i (entry 0 is the baseline)
    return len(recipe.stages)


def run(recipe: Recipe, run_dir: Path | None = None, *, resume: bool = False, overwrite: bool = False,
        search_dir: Path | None = None, on_epoch_end: Callable | None = None) -> dict:
    """Run a validated recipe. Returns the report (also written to run_dir/report.json). Under torchrun
    every rank runs it; rank 0 alone writes `run_dir` (see `torchslim.distributed`)."""
    run_dir = Path(run_dir or recipe.output or Path("runs") / recipe.name)
    with distributed.rank_dir(run_dir, lambda: prepare_run_dir(run_dir, recipe, resume, overwrite)) as (where, state):
        if recipe.task == "embedding":
            from torchslim.encoders.run import run_embedding
            return run_embedding(recipe, where, state, resume=resume, on_epoch_end=on_epoch_end)
        return _run_classifier(recipe, where, state, resume=resume, search_dir=search_dir, on_epoch_end=on_epoch_end)


def _run_classifier(recipe: Recipe, run_dir: Path, state: dict | None, *, resume: bool, search_dir: Path | None,
                    on_epoch_end: Callable | None) -> dict:
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data, search_dir)
    architecture = {"model": recipe.model.model_dump(mode="json", exclude={"checkpoint"}), "ops": []}
    model = build_model(recipe.model, data.num_classes, search_dir)
    ctx = RunContext(recipe, data, run_dir, device=_device(recipe.device), resume=resume, search_dir=search_dir,
                     on_epoch_end=on_epoch_end, architecture=architecture)
    _check_shapes(model, ctx)
    entries: list[dict] = list(state["stages"]) if state else []
    if entries:
        changed = [e["architecture"] for e in entries if "architecture" in e]
        if changed:  # a stage replaced the model (a student): rebuild that architecture
            ctx.architecture = changed[-1]
            model = build_architecture(changed[-1], data.num_classes, search_dir)
        load_weights(model, run_dir / Path(entries[-1]["dir"]) / "model.safetensors")
        lowered = [e for e in entries if "quantization" in e]
        if lowered:  # later stages carry the lowered artifact, as in the uninterrupted run
            ctx.artifact_onnx = run_dir / entries[-1]["artifact"]
        console.log(f"resuming {run_dir}: {len(entries)} stage(s) done, continuing with stage {len(entries)}")
    measure_fn = lambda model, ctx: measure(model, ctx, ctx.stage_dir, ctx.onnx_path)  # noqa: E731
    return run_stages(recipe, run_dir, ctx, model, entries, measure_fn, _log_metrics, data.input.to_dict())


def run_stages(recipe: Recipe, run_dir: Path, ctx, model: torch.nn.Module, entries: list[dict],
               measure_fn: Callable, log_fn: Callable, input_spec: dict, metric: str = "accuracy") -> dict:
    """The stages not yet in `entries`, in order: apply, measure (`measure_fn(model, ctx)` -> (metrics,
    artifact)), record; state.json and a running report.json after every stage, the final report and
    report.html at the end. Shared by every task."""
    env, ref = environment(recipe.measure.threads), _reference_index(recipe)
    plan = [("baseline", None)] + [(s.name, s) for s in recipe.stages]
    base_state = {"recipe_hash": recipe_hash(recipe), "status": "running"}
    for index, (name, spec) in enumerate(plan):
        if index < len(entries):
            continue
        ctx.stage_dir = run_dir / "stages" / f"{index:02d}-{name}"
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        ctx.stage_info, ctx.onnx_path = {}, None
        console.log(f"stage {index}: {name}")
        start = time.perf_counter()
        if spec is not None:
            model = get_stage(name).apply(model, spec.config, ctx)
        seconds = time.perf_counter() - start
        metrics, artifact = distributed.on_main(lambda: _measured(measure_fn, model, ctx, run_dir))
        entries.append({"name": name, "seconds": seconds, "metrics": metrics, "artifact": artifact,
                        "dir": str(ctx.stage_dir.relative_to(run_dir)),
                        "config": spec.config.model_dump(mode="json") if spec else {}, **ctx.stage_info})
        log_fn(name, metrics)
        write_json(run_dir / STATE, {**base_state, "stages": entries})
        write_json(run_dir / "report.json", build_report(recipe.to_dict(), env, entries, input_spec,
                                                         min(ref, len(entries) - 1), "running", metric))
    report = build_report(recipe.to_dict(), env, entries, input_spec, ref, "complete", metric)
    write_json(run_dir / "report.json", report)
    from torchslim.report.html import write_html
    write_html(report, run_dir / "report.html")
    write_json(run_dir / STATE, {**base_state, "status": "complete", "stages": entries})
    return report


def _measured(measure_fn: Callable, model: torch.nn.Module, ctx, run_dir: Path) -> tuple[dict, str]:
    metrics, artifact = measure_fn(model, ctx)
    return metrics, str(artifact.relative_to(run_dir))


def _log_metrics(name: str, m: dict) -> None:
    acc = f"accuracy {m['accuracy']:.4f}, " if "accuracy" in m else ""
    console.log(f"{name}: {acc}size {m['size_bytes'] / 1e6:.2f} MB, params {m['params']:,}, "
                f"latency p50 {m['latency_ms']['p50']:.2f} ms ({m['latency_ms']['runtime']}, "
                f"batch {m['latency_ms']['batch_size']}, {m['latency_ms']['threads']} threads)")

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
from torchslim.measure.compare import compare_stages
from torchslim.train import collect_warnings, console, warn

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
        collect_warnings()
        console.log(f"stage {index}: {name}")
        start = time.perf_counter()
        if spec is not None:
            model = get_stage(name).apply(model, spec.config, ctx)
        seconds = time.perf_counter() - start
        metrics, artifact = distributed.on_main(lambda: _measured(measure_fn, model, ctx, run_dir))
        said = collect_warnings()
        entries.append({"name": name, "seconds": seconds, "metrics": metrics, "artifact": artifact,
                        "dir": str(ctx.stage_dir.relative_to(run_dir)),
                        "config": spec.config.model_dump(mode="json") if spec else {}, **ctx.stage_info,
                        **({"warnings": said} if said else {})})
        log_fn(name, metrics)
        write_json(run_dir / STATE, {**base_state, "stages": entries})
        write_json(run_dir / "report.json", build_report(recipe.to_dict(), env, entries, input_spec,
                                                         min(ref, len(entries) - 1), "running", metric))
    comparison = distributed.on_main(lambda: _compare(recipe, run_dir, ctx, entries, ref))
    report = build_report(recipe.to_dict(), env, entries, input_spec, ref, "complete", metric, comparison)
    if recipe.summary.control:
        report["control"] = control_run(recipe, run_dir, ctx, entries, ref, measure_fn)
        if "metrics" in report["control"] and metric in report["control"]["metrics"]:
            report["summary"][f"{metric}_vs_control"] = entries[-1]["metrics"][metric] - \
                report["control"]["metrics"][metric]
    write_json(run_dir / "report.json", report)
    from torchslim.report.html import write_html
    write_html(report, run_dir / "report.html")
    write_json(run_dir / STATE, {**base_state, "status": "complete", "stages": entries})
    return report


def _training_settings(recipe: Recipe, ref: int):
    """The first training settings used after the reference stage (a fine-tune, distillation or QAT)."""
    from torchslim.train import TrainConfig
    for spec in recipe.stages[ref:]:
        config = spec.config
        if isinstance(config, TrainConfig):
            return config
        for value in vars(config).values():
            if isinstance(value, TrainConfig):
                return value
    return None


def control_run(recipe: Recipe, run_dir: Path, ctx, entries: list[dict], ref: int, measure_fn: Callable) -> dict:
    """The reference model fine-tuned for the epochs the final model trained after it, with the same
    settings, measured like every stage (folder `control/`)."""
    from torchslim.train import cross_entropy_loss
    epochs = sum(len(e.get("history") or []) for e in entries[ref + 1:])
    settings = _training_settings(recipe, ref)
    if recipe.task != "classification":
        return {"skipped": f"the control run is built for classification; task {recipe.task} has none yet"}
    if not epochs or settings is None:
        return {"skipped": "the final model had no training after the reference stage"}
    cfg = settings.model_copy(update={"epochs": epochs, "early_stopping": None})
    arch = next((e["architecture"] for e in reversed(entries[:ref + 1]) if "architecture" in e),
                {"model": recipe.model.model_dump(mode="json", exclude={"checkpoint"}), "ops": []})
    model = build_architecture(arch, ctx.data.num_classes, ctx.search_dir)
    load_weights(model, run_dir / entries[ref]["dir"] / "model.safetensors")
    console.log(f"control: the reference '{entries[ref]['name']}' fine-tuned for {epochs} epoch(s) with the same "
                "settings as the compressed model's training")
    ctx.stage_dir = run_dir / "control"
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    ctx.onnx_path, ctx.artifact_onnx, saved = None, None, ctx.artifact_onnx
    result = ctx.fit(model, ctx.data.train, cfg, cross_entropy_loss(cfg.label_smoothing),
                     checkpoint_dir=ctx.stage_dir / "checkpoint", description="control")
    metrics, artifact = distributed.on_main(lambda: _measured(measure_fn, model.cpu(), ctx, run_dir))
    ctx.artifact_onnx = saved
    return {"reference_stage": entries[ref]["name"], "epochs": epochs, "train": cfg.model_dump(mode="json"),
            "metrics": metrics, "artifact": artifact, "history": result.history}


def _compare(recipe: Recipe, run_dir: Path, ctx, entries: list[dict], ref: int) -> dict | None:
    """Every stage's artifact timed again side by side; warnings for slowdowns and a noisy machine."""
    if recipe.measure.compare_seconds <= 0 or ref == len(entries) - 1:
        return None
    console.log("timing every stage's artifact side by side (interleaved) for the summary")
    record = compare_stages(entries, run_dir, ref, ctx.comparison_feeds, recipe.measure.threads,
                            recipe.measure.compare_seconds, recipe.measure.repeats)
    for label, shape in record.get("shapes", {}).items():
        s = shape["speedup"]
        console.log(f"{label}: final vs reference {s['median']:.2f}x faster (per-round ratio, quartiles "
                    f"{s['q25']:.2f}-{s['q75']:.2f}, {shape['rounds']} rounds)")
        for slow in shape["slowdowns"]:
            warn(f"{label}: stage '{slow['stage']}' made the model SLOWER: {slow['from_ms']:.2f} -> "
                 f"{slow['to_ms']:.2f} ms ({slow['ratio']:.2f}x the time of '{slow['after']}', interleaved)")
    for note in record.get("noise", []):
        warn(f"noisy timing: {note}; re-run on an idle machine before trusting the speedups")
    record["warnings"] = collect_warnings()
    return record


def _measured(measure_fn: Callable, model: torch.nn.Module, ctx, run_dir: Path) -> tuple[dict, str]:
    metrics, artifact = measure_fn(model, ctx)
    return metrics, str(artifact.relative_to(run_dir))


def _log_metrics(name: str, m: dict) -> None:
    acc = f"accuracy {m['accuracy']:.4f}, " if "accuracy" in m else ""
    console.log(f"{name}: {acc}size {m['size_bytes'] / 1e6:.2f} MB, params {m['params']:,}, "
                f"latency p50 {m['latency_ms']['p50']:.2f} ms ({m['latency_ms']['runtime']}, "
                f"batch {m['latency_ms']['batch_size']}, {m['latency_ms']['threads']} threads)")

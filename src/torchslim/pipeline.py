"""Runs the recipe's stages in order, measures after each, and writes the report.

The run directory holds `state.json` (what has finished), one folder per stage with its artifacts,
`report.json` and `report.html`. A run that dies resumes from the last finished stage and, inside a
training stage, from its last epoch checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from torchslim import distributed, lock, words
from torchslim.context import RunContext
from torchslim.entrypoint import call_user
from torchslim.errors import RunDirError, TorchslimError
from torchslim.io import write_json
from torchslim.log import collect_warnings, console, warn
from torchslim.measure import measure
from torchslim.measure.compare import compare_stages
from torchslim.models.io import load_weights
from torchslim.paths import check_patterns
from torchslim.recipe import Recipe, parse_recipe
from torchslim.registry import get_stage
from torchslim.report.json import build_report, environment
from torchslim.results import Exported, Lowered, Restructured, StageResult, as_result
from torchslim.tasks import make_task
from torchslim.train import TrainConfig

STATE = "state.json"
OWNED = ("stages", "control", "plan.yaml", STATE, "report.json", "report.html")


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> dict | None:
    """Check the output directory against what was asked, take its lock (`torchslim.lock`) and mark
    the run as started; returns the saved state when resuming. The state is written before anything
    else runs, so a run interrupted at any moment (even while the baseline is measured) resumes."""
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"Cannot write to the output directory {run_dir}: {exc.strerror}. Choose another with --out."
        ) from None
    held = lock.acquire(run_dir)
    try:
        state = _check_run_dir(run_dir, recipe, resume, overwrite, existed)
        if state is None:
            write_json(run_dir / STATE, {"recipe_hash": recipe_hash(recipe), "status": "running", "stages": []})
    except BaseException:
        lock.release(held)
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return state


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, existed: bool) -> dict | None:
    state_path = run_dir / STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else None
    except ValueError:
        state = None  # not written by torchslim (its writes are atomic)
    if state is not None and not (isinstance(state, dict) and {"recipe_hash", "stages"} <= set(state)):
        state = None
    others = [p.name for p in run_dir.iterdir() if p.name not in (lock.LOCK, STATE)] if existed else []
    if resume:
        if state is None:
            raise RunDirError(
                f"Nothing to resume in {run_dir}: it has no {STATE} of a torchslim run. Start it without --resume"
                + (" (and with another --out: that folder holds other files)." if others else ".")
            )
        if state["recipe_hash"] != recipe_hash(recipe):
            raise RunDirError(
                f"{run_dir} holds a run of a different recipe (or the recipe changed since); "
                "resume with the same recipe, or pass --overwrite to start again."
            )
        return state
    if state is None and others:
        raise RunDirError(
            f"{run_dir} is not empty and is not a torchslim run directory (it holds {', '.join(sorted(others)[:5])}"
            f"{', ...' if len(others) > 5 else ''}); choose an empty or new directory with --out so nothing of "
            "yours is overwritten" + (" (--overwrite only replaces a torchslim run)." if overwrite else ".")
        )
    if overwrite:
        for name in OWNED:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    if state is not None:
        what = "a finished run" if state.get("status") == "complete" else "an unfinished run (resume it with --resume)"
        raise RunDirError(
            f"{run_dir} already holds {what}. Pass --overwrite to replace it, or choose another directory with --out."
        )
    return None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TorchslimError("device: cuda was asked for but no CUDA device is available; use 'cpu' or 'auto'.")
    return torch.device(name)


def _reference_index(recipe: Recipe, task) -> int:
    """Compression is judged against the model as it stood before the first compressing stage."""
    for i, stage in enumerate(recipe.stages):
        if get_stage(stage.name, task=task).compresses:
            return i  # entry i is the stage just before stage i (entry 0 is the baseline)
    return len(recipe.stages)


def run(
    recipe: Recipe,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    search_dir: Path | None = None,
    on_epoch_end: Callable | None = None,
) -> dict:
    """Run a validated recipe of any task. Returns the report (also written to run_dir/report.json).
    Under torchrun every rank runs it; rank 0 alone writes `run_dir` (see `torchslim.distributed`)."""
    run_dir = Path(run_dir or recipe.output or Path("runs") / recipe.name)
    try:
        with distributed.rank_dir(run_dir, lambda: prepare_run_dir(run_dir, recipe, resume, overwrite)) as (
            where,
            state,
        ):
            return _run_in(recipe, where, state, resume, search_dir, on_epoch_end)
    finally:
        lock.release(run_dir / lock.LOCK)  # only the process that holds it removes it


def _run_in(recipe: Recipe, where: Path, state: dict | None, resume: bool, search_dir, on_epoch_end) -> dict:
    """One process's part of a run in its readied directory `where` (see `run`)."""
    torch.manual_seed(recipe.seed)
    task = make_task(recipe, search_dir)
    model = task.setup()
    task.check(model)
    ctx = RunContext(
        recipe,
        task,
        where,
        device=_device(recipe.device),
        resume=resume,
        search_dir=search_dir,
        on_epoch_end=on_epoch_end,
        architecture=task.architecture(),
        run_recipe=partial(run_plain, search_dir=search_dir),
    )
    entries: list[dict] = list(state["stages"]) if state else []
    if entries:
        model = _restore(ctx, entries)
    return run_stages(ctx, model, entries)


def run_plain(
    data: dict, run_dir: Path, *, resume: bool = False, source: Path | str = "recipe", search_dir: Path | None = None
) -> dict:
    """Parse plain recipe data (a plan the planner wrote) and run it: how stages run other recipes."""
    return run(parse_recipe(data, source, search_dir), run_dir, resume=resume, search_dir=search_dir)


def load_model(run_dir: Path | str, stage: int | str | None = None, search_dir: Path | None = None) -> torch.nn.Module:
    """The PyTorch model a finished stage of a run left (the last by default; a stage index, or its
    name), rebuilt in this process from the run's own records: its recipe, the structure the stages
    recorded (kept blocks, pruned widths, students) and the stage's saved weights."""
    run_dir = Path(run_dir)
    state_path, report_path = run_dir / STATE, run_dir / "report.json"
    if not state_path.exists() or not report_path.exists():
        raise RunDirError(f"{run_dir} is not a torchslim run directory (no {STATE} or report.json).")
    entries = json.loads(state_path.read_text())["stages"]
    names = [e["name"] for e in entries]
    if stage is None:
        index = len(entries) - 1
    elif isinstance(stage, int) and -len(entries) <= stage < len(entries):
        index = stage % len(entries)
    elif isinstance(stage, str) and stage in names:
        index = len(names) - 1 - names[::-1].index(stage)
    else:
        raise TorchslimError(
            f"{run_dir} has no finished stage {stage!r}; its stages: {', '.join(names)} "
            f"(indices 0 to {len(names) - 1})."
        )
    recipe = parse_recipe(json.loads(report_path.read_text())["recipe"], report_path, search_dir)
    task = make_task(recipe, search_dir)
    task.setup()
    return _model_at(task, run_dir, entries, index)[0].eval()


def _model_at(task, run_dir: Path, entries: list[dict], index: int) -> tuple[torch.nn.Module, dict]:
    """(the model stage `index` left, its architecture record): the last structure recorded up to it,
    rebuilt by the task, with the stage's saved weights."""
    arch = next((e["architecture"] for e in reversed(entries[: index + 1]) if "architecture" in e), task.architecture())
    model = task.rebuild(arch)
    load_weights(model, run_dir / entries[index]["dir"] / "model.safetensors")
    return model, arch


def _restore(ctx: RunContext, entries: list[dict]) -> torch.nn.Module:
    """The model (and the served artifact) as the finished stages left them, from their records."""
    # a stage that replaced the model (a student, kept layers) recorded the architecture to rebuild
    model, ctx.architecture = _model_at(ctx.task, ctx.run_dir, entries, len(entries) - 1)
    if any(e.get("result") == Lowered.kind for e in entries):  # later stages carry the lowered artifact
        ctx.artifact = ctx.run_dir / entries[-1]["artifact"]
    console.log(f"resuming {ctx.run_dir}: {len(entries)} stage(s) done, continuing with stage {len(entries)}")
    return model


def _apply(index: int, name: str, spec, model: torch.nn.Module, ctx: RunContext) -> tuple[StageResult, Path | None]:
    """Run one stage; fold its typed result into the run's state. Returns (result, an ONNX file the
    measurement reuses)."""
    if spec is None:
        return StageResult(model), None
    for key in ("ignore", "exclude"):  # layers left alone: a pattern that matches nothing is a mistake
        patterns = getattr(spec.config, key, None)
        if isinstance(patterns, (list, tuple)) and patterns:
            check_patterns(patterns, [n for n, _ in model.named_modules()], f"stages[{index - 1}].{name}.{key}")
    handler = get_stage(name, task=ctx.task)
    if handler.apply.__module__.partition(".")[0] == "torchslim":
        result = handler.apply(model, spec.config, ctx)
    else:  # a plugin's stage: when it raises, the message names it and shows its frames, not ours
        what = f"stage '{name}' ({handler.apply.__module__}.{handler.apply.__qualname__}, a plugin)"
        result = call_user(handler.apply, model, spec.config, ctx, what=what)
    result = as_result(result)
    onnx = None
    if isinstance(result, Restructured):
        ctx.architecture = result.architecture
    elif isinstance(result, Lowered):
        ctx.artifact = onnx = result.artifact
    elif isinstance(result, Exported) and result.onnx is not None:
        onnx = result.onnx
        if ctx.artifact is not None:  # the exported copy of the lowered artifact is the deliverable now
            ctx.artifact = onnx
    return result, onnx


def run_stages(ctx: RunContext, model: torch.nn.Module, entries: list[dict]) -> dict:
    """The stages not yet in `entries`, in order: apply, measure, record; state.json and a running
    report.json after every stage, the final report and report.html at the end."""
    recipe, run_dir, task = ctx.recipe, ctx.run_dir, ctx.task
    env, ref = environment(recipe.measure.threads), _reference_index(recipe, task)
    plan = [("baseline", None)] + [(s.name, s) for s in recipe.stages]
    base_state = {"recipe_hash": recipe_hash(recipe), "status": "running"}
    report_args = dict(input_spec=task.input_spec(), metric=task.metric, higher_is_better=task.higher_is_better)
    for index, (name, spec) in enumerate(plan):
        if index < len(entries):
            continue
        ctx.stage_dir = run_dir / "stages" / f"{index:02d}-{name}"
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        collect_warnings()
        # every stage starts from the same random state whether the run went straight through or resumed
        torch.manual_seed(recipe.seed + index)
        console.log(f"stage {index}: {name}")
        start = time.perf_counter()
        result, onnx = _apply(index, name, spec, model, ctx)
        model = result.model
        seconds = time.perf_counter() - start
        metrics, artifact = distributed.on_main(lambda: _measured(model, ctx, onnx))
        said = collect_warnings()
        entries.append(
            {
                "name": name,
                "seconds": seconds,
                "metrics": metrics,
                "artifact": artifact,
                "dir": str(ctx.stage_dir.relative_to(run_dir)),
                "result": result.kind,
                "config": spec.config.model_dump(mode="json") if spec else {},
                **result.info,
                **({"architecture": ctx.architecture} if isinstance(result, Restructured) else {}),
                **({"warnings": said} if said else {}),
            }
        )
        console.log(f"{name}: {task.describe(metrics)}{_cost(metrics)}")
        write_json(run_dir / STATE, {**base_state, "stages": entries})
        write_json(
            run_dir / "report.json",
            build_report(
                recipe.to_dict(), env, entries, reference=min(ref, len(entries) - 1), status="running", **report_args
            ),
        )
    comparison = distributed.on_main(lambda: _compare(ctx, entries, ref))
    report = build_report(
        recipe.to_dict(), env, entries, reference=ref, status="complete", comparison=comparison, **report_args
    )
    if recipe.summary.control:
        report["control"] = control_run(ctx, entries, ref)
        metric = task.metric
        if "metrics" in report["control"] and metric in report["control"]["metrics"]:
            report["summary"][f"{metric}_vs_control"] = (
                entries[-1]["metrics"][metric] - report["control"]["metrics"][metric]
            )
    write_json(run_dir / "report.json", report)
    # lazy: start-up time; report.html needs matplotlib and jinja2 (0.38 s of the 2.45 s `import torchslim`)
    from torchslim.report.html import write_html

    write_html(report, run_dir / "report.html")
    write_json(run_dir / STATE, {**base_state, "status": "complete", "stages": entries})
    return report


def _training_settings(recipe: Recipe, ref: int):
    """The first training settings used after the reference stage (a fine-tune, distillation or QAT)."""
    for spec in recipe.stages[ref:]:
        config = spec.config
        if isinstance(config, TrainConfig):
            return config
        for value in vars(config).values():
            if isinstance(value, TrainConfig):
                return value
    return None


def control_run(ctx: RunContext, entries: list[dict], ref: int) -> dict:
    """The reference model fine-tuned for the epochs the final model trained after it, with the same
    settings, measured like every stage (folder `control/`)."""
    recipe, run_dir, task = ctx.recipe, ctx.run_dir, ctx.task
    epochs = sum(len(e.get("history") or []) for e in entries[ref + 1 :])
    settings = _training_settings(recipe, ref)
    if "labels" not in task.provides:
        return {"skipped": f"the control run fine-tunes on labelled data, which task {task.name} has not"}
    if not epochs or settings is None:
        return {"skipped": "the final model had no training after the reference stage"}
    cfg = settings.model_copy(update={"epochs": epochs, "early_stopping": None})
    model, _ = _model_at(task, run_dir, entries, ref)
    console.log(
        f"control: the reference '{entries[ref]['name']}' fine-tuned for {epochs} epoch(s) with the same "
        "settings as the compressed model's training"
    )
    ctx.stage_dir = run_dir / "control"
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    ctx.artifact, saved = None, ctx.artifact
    result = ctx.fit(model, cfg, checkpoint_dir=ctx.stage_dir / "checkpoint", description="control")
    metrics, artifact = distributed.on_main(lambda: _measured(model.cpu(), ctx, None))
    ctx.artifact = saved
    return {
        "reference_stage": entries[ref]["name"],
        "epochs": epochs,
        "train": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "artifact": artifact,
        "history": result.history,
    }


def _compare(ctx: RunContext, entries: list[dict], ref: int) -> dict | None:
    """Every stage's artifact timed again side by side; warnings for slowdowns and a noisy machine."""
    recipe, run_dir = ctx.recipe, ctx.run_dir
    if recipe.measure.compare_seconds <= 0 or ref == len(entries) - 1:
        return None
    console.log("timing every stage's artifact side by side (interleaved) for the summary")
    record = compare_stages(
        entries,
        run_dir,
        ref,
        ctx.task.comparison_feeds,
        recipe.measure.threads,
        recipe.measure.compare_seconds,
        recipe.measure.repeats,
    )
    for label, shape in record.get("shapes", {}).items():
        s = shape["speedup"]
        console.log(
            f"{label}: final vs reference {words.speed(s['median'])} (per-round speedup, quartiles "
            f"{s['q25']:.2f}-{s['q75']:.2f}, {shape['rounds']} rounds)"
        )
        for slow in shape["slowdowns"]:
            warn(
                f"{label}: stage '{slow['stage']}' made the model SLOWER: {slow['from_ms']:.2f} -> "
                f"{slow['to_ms']:.2f} ms ({slow['ratio']:.2f}x the time of '{slow['after']}', interleaved)"
            )
    for note in record.get("noise", []):
        warn(f"noisy timing: {note}; re-run on an idle machine before trusting the speedups")
    record["warnings"] = collect_warnings()
    return record


def _measured(model: torch.nn.Module, ctx: RunContext, onnx: Path | None) -> tuple[dict, str]:
    metrics, artifact = measure(model, ctx, ctx.stage_dir, onnx)
    return metrics, str(artifact.relative_to(ctx.run_dir))


def _cost(m: dict) -> str:
    lat = m["latency_ms"]
    return (
        f"size {m['size_bytes'] / 1e6:.2f} MB, params {m['params']:,}, latency p50 {lat['p50']:.2f} ms "
        f"({lat['runtime']}, batch {lat['batch_size']}, {lat['threads']} threads)"
    )

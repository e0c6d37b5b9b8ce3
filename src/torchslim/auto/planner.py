"""The budget-driven planner: per-layer sensitivity, measured candidates, fine-tuned trials, a plan.

1. Sensitivity: the validation-accuracy drop of pruning one layer group, factorising one layer and
   quantizing one layer to int8, each alone, on the current model.
2. Screening: candidate plans (structured pruning ratio x low-rank energy x int8 or float) are applied
   one-shot to copies; each candidate's ONNX Runtime artifact is written and measured (latency in
   the recipe's runtime settings, bytes on disk, validation accuracy). Layers whose sensitivity alone
   is an outlier are pruned at half the ratio, and left out of factorisation and int8.
3. Trials: on the Pareto front (objective vs one-shot accuracy), a binary search runs real recipes
   with fine-tuning (the same stages the plan will hold) and keeps the best objective whose
   validation drop stays within the budget minus a safety margin.
4. The chosen plan is written as a plain recipe (`plan.yaml`) that re-runs from the same weights.

Every phase checks the time budget before it starts a new measurement or trial; what was skipped is
recorded. Choices use the validation split only; the test split is for the report."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from torchslim.cpu import vector_channels
from torchslim.export.onnx import export_onnx, onnx_outputs
from torchslim.io import atomic_write_text
from torchslim.log import console, steps, warn
from torchslim.lowrank.factorize import apply as apply_ranks
from torchslim.lowrank.factorize import choose_ranks, find_layers
from torchslim.measure.latency import onnxruntime_latency, ort_session
from torchslim.models.io import save_weights
from torchslim.paths import matches
from torchslim.prune.graph.structured import apply as apply_plan
from torchslim.prune.graph.structured import convert_attention
from torchslim.prune.graph.structured import plan as prune_plan
from torchslim.quantize import static
from torchslim.quantize.scheme import scheme_for
from torchslim.train import TrainConfig


class AutoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_accuracy_drop: float = Field(0.01, gt=0, lt=1, description="validation accuracy the plan may lose")
    objective: Literal["latency", "size"] = Field(
        "latency",
        description="what the plan minimises: latency (p50 at the recipe's batch and threads) or size (artifact bytes)",
    )
    time_budget_s: float = Field(1800, ge=10, description="bound on the whole search (sensitivity, screening, trials)")
    prune_ratios: list[float] = Field([0.3, 0.5, 0.65, 0.75, 0.85], description="structured ratios screened (0 added)")
    energies: list[float] = Field([0.9], description="low-rank energies screened (none added)")
    quantize: list[Literal["none", "static"]] = Field(
        ["none", "static"], description="precisions screened: float (none) and static int8"
    )
    prune_steps: int = Field(3, ge=1, le=10, description="gradual steps of the plan's pruning")
    round_to: Union[Literal["auto"], Annotated[int, Field(ge=1, le=256)]] = Field(
        "auto",
        description="kept channel counts are multiples of this; auto: the CPU's float32 vector width "
        "(ONNX Runtime's blocked convolution kernels need multiples of 8 with AVX2, 16 with AVX-512)",
    )

    @property
    def channel_multiple(self) -> int:
        return vector_channels() if self.round_to == "auto" else self.round_to

    recalibration_batches: int = Field(
        20,
        ge=0,
        description="training batches that re-estimate batch-norm "
        "statistics of a one-shot candidate before it is measured",
    )
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=1, lr=0.001, precision="auto"),
        description="fine-tuning after each pruning step and after factorisation",
    )
    margin: float = Field(0.2, ge=0, lt=1, description="share of the budget held back on validation")
    max_trials: int = Field(4, ge=1, le=20, description="fine-tuned trials at most")
    sensitivity_samples: int = Field(
        1000,
        ge=100,
        description="validation examples the per-layer sensitivity and the one-shot candidates are measured on",
    )
    calibration_batches: int = Field(8, ge=1, description="training batches that calibrate the int8 candidates")


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget, self.skipped = time.perf_counter(), budget, []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str) -> bool:
        if self.elapsed < self.budget:
            return True
        self.skipped.append(what)
        return False


def _val(ctx, n: int | None = None):
    val = ctx.data.val
    n = len(val) if n is None else min(n, len(val))
    xs, ys = zip(*(val[i] for i in range(n)))
    return torch.stack(xs), np.asarray([int(y) for y in ys])


def _accuracy(session_or_model, x: torch.Tensor, y: np.ndarray) -> float:
    if isinstance(session_or_model, torch.nn.Module):
        with torch.inference_mode():
            out = torch.cat([session_or_model.eval()(x[i : i + 512]) for i in range(0, len(x), 512)]).numpy()
    else:
        out = onnx_outputs(session_or_model, x.numpy())
    return float((out.argmax(1) == y).mean())


# --------------------------------------------------------------------------------- sensitivity


def sensitivity(model, ctx, cfg: AutoConfig, clock: Clock, work: Path) -> dict:
    """Per-layer accuracy drop for pruning half of one group, factorising one layer at the lowest
    screened energy, and int8 of one layer."""
    x, y = _val(ctx, cfg.sensitivity_samples)
    example = ctx.real_batch(2)
    base = _accuracy(model, x, y)
    out = {"base_val_accuracy": base, "prune": [], "lowrank": [], "int8": [], "scheme": None}
    groups = prune_plan(model, example, 0.0).groups
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for k, grp in enumerate(groups):
        name = grp.producers[0]
        if not clock.allows(f"prune sensitivity {name}"):
            break
        start = time.perf_counter()
        trial = copy.deepcopy(model)
        apply_plan(trial, prune_plan(trial, example, {name: 0.5, "default": 0.0}, round_to=cfg.channel_multiple))
        recalibrate_batch_norm(trial, ctx, cfg.recalibration_batches)
        out["prune"].append({"layer": name, "ratio": 0.5, "drop": base - _accuracy(trial, x, y)})
        if k == 0:  # say up front when the budget cannot even cover the sensitivity pass
            items = len(groups) + (2 if "static" in cfg.quantize else 1) * len(layers)
            need = (time.perf_counter() - start) * items
            out["estimated_sensitivity_s"] = need
            if need > 0.5 * cfg.time_budget_s:
                warn(
                    f"auto: the sensitivity pass alone needs about {need:.0f} s ({items} one-layer trials), "
                    f"{'more than' if need > cfg.time_budget_s else 'over half of'} the {cfg.time_budget_s:.0f} s "
                    f"time budget, leaving little or nothing for screening and fine-tuned trials; give "
                    f"--time-budget {max(3 * need, 600):.0f} or more (time_budget_s in a recipe)."
                )
    energy = min(cfg.energies) if cfg.energies else None
    for layer in find_layers(model, example) if energy else []:
        if not clock.allows(f"lowrank sensitivity {layer.path}"):
            break
        trial = copy.deepcopy(model)
        found = [f for f in find_layers(trial, example) if f.path == layer.path]
        choose_ranks(found, trial, energy=energy)
        if not found[0].ranks:
            continue
        apply_ranks(trial, found)
        out["lowrank"].append(
            {"layer": layer.path, "energy": energy, "rank": list(found[0].ranks), "drop": base - _accuracy(trial, x, y)}
        )
    if "static" in cfg.quantize:
        out["int8"], out["scheme"] = _int8_sensitivity(model, ctx, cfg, clock, work, (x, y))
    for key in ("prune", "lowrank", "int8"):
        out[key].sort(key=lambda r: -r["drop"])
    return out


def _int8_sensitivity(
    model, ctx, cfg: AutoConfig, clock: Clock, work: Path, val: tuple
) -> tuple[list[dict], dict | None]:
    """The quantize stage's own static int8 path (quantize/static.py) on the current model: the scheme
    chosen on this CPU, then each node quantized alone in it. Returns the sensitivity rows and the scheme
    record (None when the time budget skipped the choice)."""
    x, y = val
    float_onnx = export_onnx(copy.deepcopy(model).eval(), work / "sens.onnx", ctx.data.input, ctx.exporter)
    cal = static.prepare(float_onnx, work / "sens.pre.onnx", static.calibration_batches(ctx, cfg.calibration_batches))
    threads = ctx.recipe.measure.threads
    base_onnx = _accuracy(ort_session(float_onnx, threads), x, y)
    score = lambda path: _accuracy(ort_session(path, threads), x, y)  # noqa: E731
    scheme, record = static.S8S8, None
    if clock.allows("int8 scheme choice"):  # the quantize stage's own choice, made on this CPU
        scheme, choice = static.choose_activation_scheme(
            cal,
            score,
            ctx.task.feed(ctx.example(ctx.recipe.measure.batch_size)),
            threads,
            0.002,
        )
        record = {"activation_type": scheme.activation_type, "reduce_range": scheme.reduce_range, "choice": choice}
    modules = {name: module for name, _, module in cal.nodes}
    rows = static.layer_sensitivity(
        cal,
        score,
        base_onnx,
        scheme,
        what="auto: int8",
        allows=lambda name: clock.allows(f"int8 sensitivity {modules[name]}"),
    )
    return rows, record


def _sensitive(rows: list[dict], threshold: float) -> list[str]:
    """The outliers: layers whose drop alone exceeds `threshold` and twice the median layer's drop
    (one-shot drops before fine-tuning are pessimistic for every layer; only outliers are protected)."""
    if not rows:
        return []
    median = float(np.median([r["drop"] for r in rows]))
    return sorted({r["layer"] for r in rows if r["drop"] > threshold and r["drop"] > 2 * max(median, 0.0)})


# ----------------------------------------------------------------------------------- screening


def candidates(cfg: AutoConfig) -> list[dict]:
    ratios = sorted({0.0, *cfg.prune_ratios})
    energies = [None, *sorted(set(cfg.energies))]
    return [{"prune": p, "energy": e, "quantize": q} for p in ratios for e in energies for q in cfg.quantize]


def recalibrate_batch_norm(model, ctx, batches: int) -> None:
    """Re-estimate batch-norm running statistics on training batches (no weights change): after
    channels are removed, the next layers' statistics are stale and one-shot accuracy collapses."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    gen = torch.Generator().manual_seed(ctx.recipe.seed)
    idx = torch.randperm(len(ctx.data.train), generator=gen)[: batches * 128].tolist()
    model.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        for i in range(0, len(idx), 128):
            model(torch.stack([ctx.data.train[j][0] for j in idx[i : i + 128]]))
    for m, momentum in saved:
        m.momentum = momentum
    model.eval()


def _gentle(avoid: dict, ratio: float) -> dict[str, float]:
    """Layers whose pruning alone is an outlier in sensitivity are cut at half the ratio."""
    return {layer: round(ratio / 2, 6) for layer in avoid["prune"]}


def _build(model, cand: dict, avoid: dict, example, ctx, cfg) -> torch.nn.Module:
    trial = copy.deepcopy(model)
    if cand["prune"]:
        convert_attention(trial)
        ratios = {"default": cand["prune"], **_gentle(avoid, cand["prune"])}
        apply_plan(trial, prune_plan(trial, example, ratios, round_to=cfg.channel_multiple))
    if cand["energy"]:
        found = find_layers(trial, example, ignore=avoid["lowrank"])
        choose_ranks(found, trial, energy=cand["energy"])
        apply_ranks(trial, found)
    recalibrate_batch_norm(trial, ctx, cfg.recalibration_batches)
    return trial.eval()


def _lower(trial, cand: dict, ctx, cfg: AutoConfig, avoid: dict, work: Path, scheme: dict | None = None) -> Path:
    path = export_onnx(trial, work / "cand.onnx", ctx.data.input, ctx.exporter)
    if cand["quantize"] == "static":
        cal = static.prepare(path, work / "cand.pre.onnx", static.calibration_batches(ctx, cfg.calibration_batches))
        exclude = [n for n, _, m in cal.nodes if matches(m, avoid["int8"])]
        path = static.quantize(
            cal, work / "cand.q.onnx", scheme_for(**scheme) if scheme else static.S8S8, exclude=exclude
        )
    return path


def screen(
    model, ctx, cfg: AutoConfig, avoid: dict, clock: Clock, work: Path, scheme: dict | None = None
) -> list[dict]:
    x, y = _val(ctx, cfg.sensitivity_samples)
    m = ctx.recipe.measure
    batch = ctx.real_batch(m.batch_size).numpy()
    example = ctx.real_batch(2)
    rows, every = [], list(candidates(cfg))
    with steps("auto: screening candidates", len(every)) as progress:
        for cand in every:
            _screen_one(model, cand, ctx, cfg, avoid, clock, work, scheme, (x, y, batch, example), rows)
            progress.advance()
    return rows


def _screen_one(
    model,
    cand: dict,
    ctx,
    cfg: AutoConfig,
    avoid: dict,
    clock: Clock,
    work: Path,
    scheme,
    data: tuple,
    rows: list[dict],
) -> None:
    """Apply one candidate one-shot to a copy, lower it, measure it; a row in `rows` (an error too)."""
    x, y, batch, example = data
    m = ctx.recipe.measure
    if clock.allows(f"candidate {cand}"):
        try:
            trial = _build(model, cand, avoid, example, ctx, cfg)
            path = _lower(trial, cand, ctx, cfg, avoid, work, scheme)
        except Exception as exc:  # a candidate the model cannot take is recorded, not fatal
            rows.append({**cand, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            return
        session = ort_session(path, m.threads)
        latency = onnxruntime_latency(path, batch, m.threads, m.warmup, m.repeats, session=session)
        rows.append(
            {
                **cand,
                "latency_ms": latency["p50"],
                "p95_ms": latency["p95"],
                "size_bytes": path.stat().st_size,
                "params": sum(p.numel() for p in trial.parameters()),
                "val_accuracy": _accuracy(session, x, y),
            }
        )
        console.log(
            f"auto: candidate prune {cand['prune']}, energy {cand['energy']}, {cand['quantize']}: "
            f"{rows[-1]['latency_ms']:.3f} ms, {rows[-1]['size_bytes']:,} B, "
            f"one-shot val {rows[-1]['val_accuracy']:.4f} ({clock.elapsed:.0f} of {cfg.time_budget_s:.0f} s "
            "of the time budget used)"
        )


def pareto(rows: list[dict], key: str) -> list[dict]:
    """Candidates no other candidate beats on both the objective (lower) and one-shot accuracy (higher)."""
    ok = [r for r in rows if "error" not in r]
    front = [
        r
        for r in ok
        if not any(
            o[key] <= r[key]
            and o["val_accuracy"] >= r["val_accuracy"]
            and (o[key] < r[key] or o["val_accuracy"] > r["val_accuracy"])
            for o in ok
        )
    ]
    return sorted(front, key=lambda r: r[key])


# ------------------------------------------------------------------------------------- plans


def plan_recipe(ctx, cand: dict, avoid: dict, cfg: AutoConfig, checkpoint: Path, name: str) -> dict:
    """The plain recipe that applies `cand` to the weights in `checkpoint`."""
    recipe = ctx.recipe
    tune = cfg.finetune.model_dump(mode="json", exclude_defaults=True)
    stages: list[dict] = []
    if cand["prune"]:
        stages.append(
            {
                "prune": {
                    "method": "structured",
                    "ratio": cand["prune"],
                    "importance": "l1",
                    "layer_ratios": _gentle(avoid, cand["prune"]),
                    "round_to": cfg.channel_multiple,
                    "schedule": {"kind": "gradual" if cfg.prune_steps > 1 else "one_shot", "steps": cfg.prune_steps},
                    "finetune": tune,
                }
            }
        )
    if cand["energy"]:
        stages.append({"lowrank": {"energy": cand["energy"], "ignore": avoid["lowrank"], "finetune": tune}})
    if cand["quantize"] == "static":
        stages.append(
            {
                "quantize": {
                    "method": "static",
                    "per_channel": True,
                    "calibration_batches": cfg.calibration_batches,
                    "ignore": avoid["int8"],
                    "max_accuracy_drop": round(0.3 * cfg.max_accuracy_drop, 6),
                }
            }
        )
    stages.append({"export": {"format": "all"}})
    model = {**ctx.architecture["model"], "checkpoint": str(checkpoint)}
    return {
        "name": name,
        "description": f"Plan chosen by torchslim auto (objective {cfg.objective}, "
        f"max accuracy drop {cfg.max_accuracy_drop}) for {recipe.name}.",
        "seed": recipe.seed,
        "model": model,
        "data": recipe.data.model_dump(mode="json"),
        "task": recipe.task,
        "device": recipe.device,
        "measure": recipe.measure.model_dump(mode="json"),
        "stages": stages,
    }


def run_trial(plan: dict, trial_dir: Path, ctx) -> dict:
    """Run a plan recipe as a real run (resumable), then measure its artifact on the validation split."""
    state = trial_dir / "state.json"
    if state.exists() and json.loads(state.read_text()).get("status") == "complete":
        report = json.loads((trial_dir / "report.json").read_text())
    else:
        report = ctx.run_recipe(
            plan, trial_dir, resume=state.exists(), source=trial_dir.parent / f"{trial_dir.name}.yaml"
        )
    final = report["stages"][-1]
    x, y = _val(ctx)
    artifact = trial_dir / final["artifact"]
    session = ort_session(artifact, ctx.recipe.measure.threads) if artifact.suffix == ".onnx" else None
    return {
        "report": report,
        "artifact": artifact,
        "final_dir": trial_dir / final["dir"],
        "val_accuracy": _accuracy(session, x, y) if session else None,
        "latency_ms": final["metrics"]["latency_ms"]["p50"],
        "size_bytes": final["metrics"]["size_bytes"],
        "test_accuracy": final["metrics"].get("accuracy"),
    }


def search(model, ctx, cfg: AutoConfig) -> dict:
    """The whole planner on the current model; returns the record the `auto` stage reports."""
    clock = Clock(cfg.time_budget_s)
    stage_dir = ctx.stage_dir
    checkpoint = save_weights(model, stage_dir / "input.safetensors")
    key = "latency_ms" if cfg.objective == "latency" else "size_bytes"
    screened = stage_dir / "screening.json"
    if ctx.resume and screened.exists():  # sensitivity and screening are done; go on with the trials
        saved = json.loads(screened.read_text())
        sens, avoid, rows = saved["sensitivity"], saved["avoid"], saved["candidates"]
        clock.start -= saved["seconds"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            sens = sensitivity(model, ctx, cfg, clock, work)
            threshold = cfg.max_accuracy_drop / 2
            avoid = {k: _sensitive(sens[k], threshold) for k in ("prune", "lowrank", "int8")}
            chosen = sens.get("scheme") or {}
            rows = screen(
                model,
                ctx,
                cfg,
                avoid,
                clock,
                work,
                {k: chosen[k] for k in ("activation_type", "reduce_range") if k in chosen},
            )
        atomic_write_text(
            screened, json.dumps({"sensitivity": sens, "avoid": avoid, "candidates": rows, "seconds": clock.elapsed})
        )
    front = pareto(rows, key)
    x, y = _val(ctx)
    onnx_base = _accuracy(model, x, y)
    allowed = cfg.max_accuracy_drop * (1 - cfg.margin)
    trials, lo, hi = [], 0, len(front) - 1
    best = None
    while lo <= hi and len(trials) < cfg.max_trials:
        mid = (lo + hi) // 2
        cand = {k: front[mid][k] for k in ("prune", "energy", "quantize")}
        if not clock.allows(f"trial {cand}"):
            break
        plan = plan_recipe(ctx, cand, avoid, cfg, checkpoint.resolve(), f"{ctx.recipe.name}-plan")
        trial_dir = stage_dir / "trials" / f"{len(trials):02d}"
        trial_dir.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(trial_dir.parent / f"{trial_dir.name}.yaml", yaml.safe_dump(plan, sort_keys=False))
        result = run_trial(plan, trial_dir, ctx)
        drop = onnx_base - result["val_accuracy"]
        record = {
            **cand,
            "dir": str(trial_dir.relative_to(ctx.run_dir)),
            "val_accuracy": result["val_accuracy"],
            "val_drop": drop,
            "latency_ms": result["latency_ms"],
            "size_bytes": result["size_bytes"],
            "meets_budget": drop <= allowed,
        }
        trials.append(record)
        console.log(
            f"auto: trial {len(trials)} prune {cand['prune']}, energy {cand['energy']}, {cand['quantize']}: "
            f"val drop {100 * drop:.2f} pt (allowed {100 * allowed:.2f}), {result['latency_ms']:.3f} ms, "
            f"{result['size_bytes']:,} B ({clock.elapsed:.0f} of {cfg.time_budget_s:.0f} s of the time "
            "budget used)"
        )
        if record["meets_budget"]:
            if best is None or record[key] < best[0][key]:
                best = (record, plan, result)
            hi = mid - 1
        else:
            lo = mid + 1
    return {
        "objective": cfg.objective,
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "allowed_val_drop": allowed,
        "val_accuracy": onnx_base,
        "sensitivity": sens,
        "avoid": avoid,
        "candidates": rows,
        "front": front,
        "trials": trials,
        "chosen": best,
        "search_seconds": clock.elapsed,
        "time_budget_s": cfg.time_budget_s,
        "skipped": clock.skipped,
    }

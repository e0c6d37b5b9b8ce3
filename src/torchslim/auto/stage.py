"""The `auto` recipe stage: run the planner on the current model and continue with the chosen plan's
result; the plan itself is written as a plain recipe (`plan.yaml`, in the stage and the run folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from torchslim import distributed
from torchslim.auto.planner import AutoConfig, plan_recipe, search
from torchslim.errors import TorchslimError
from torchslim.io import atomic_write_text
from torchslim.log import console
from torchslim.models.io import load_weights
from torchslim.registry import register_stage
from torchslim.results import Lowered, StageResult


@register_stage("auto", AutoConfig, compresses=True, lowers=True, needs=("classifier",))
def auto(model, cfg: AutoConfig, ctx):
    """Measure sensitivity, screen measured candidates, fine-tune the promising ones, apply the best plan."""
    if distributed.world() > 1:
        raise TorchslimError(
            "auto times candidates on this machine, which processes running side by side would "
            "distort: run `torchslim auto` in one process, then run the plan.yaml it writes "
            "under torchrun."
        )
    if ctx.architecture.get("ops"):
        raise TorchslimError(
            "auto: the current model was changed structurally by an earlier stage in a way a "
            "plan recipe cannot rebuild (kept blocks); run auto on the recipe's own model."
        )
    if ctx.artifact is not None:
        raise TorchslimError("auto: the model is already quantized by an earlier stage; put auto before quantize.")
    info, artifact, quantization = search(model, ctx, cfg), None, None
    chosen = info.pop("chosen")
    notes = [f"search took {info['search_seconds']:.0f} s of a {cfg.time_budget_s:.0f} s budget"]
    if info["skipped"]:
        notes.append(f"time budget reached: {len(info['skipped'])} step(s) skipped (first: {info['skipped'][0]})")
    if chosen is None:
        plan = plan_recipe(
            ctx,
            {"prune": 0.0, "energy": None, "quantize": "none"},
            info["avoid"],
            cfg,
            (ctx.stage_dir / "input.safetensors").resolve(),
            f"{ctx.recipe.name}-plan",
        )
        notes.append("no fine-tuned trial stayed within the budget; the model is left as it was")
        info["chosen_trial"] = None
    else:
        record, plan, result = chosen
        info["chosen_trial"] = info["trials"].index(record)
        load_weights(model, result["final_dir"] / "model.safetensors")
        if record["quantize"] != "none":
            artifact = Path(shutil.copyfile(result["artifact"], ctx.stage_dir / "model.onnx"))
            quantization = [s for s in result["report"]["stages"] if "quantization" in s][-1]["quantization"]
        notes.append(
            f"chosen: prune {record['prune']}, low-rank energy {record['energy']}, {record['quantize']}: "
            f"validation drop {100 * record['val_drop']:.2f} pt"
        )
    text = yaml.safe_dump(plan, sort_keys=False)
    atomic_write_text(ctx.stage_dir / "plan.yaml", text)
    atomic_write_text(ctx.run_dir / "plan.yaml", text)
    for note in notes:
        console.log(f"auto: {note}")
    record = dict(auto=info, notes=notes, plan=str((ctx.run_dir / "plan.yaml").relative_to(ctx.run_dir)))
    if artifact is None:
        return StageResult(model, record)
    return Lowered(model, {**record, "quantization": quantization}, artifact=artifact)

"""The `torchslim` command: run a recipe, analyze a model, list the built-in recipes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from torchslim import distributed, pipeline
from torchslim.analyze import analyze_model
from torchslim.entrypoint import PATTERN
from torchslim.errors import TorchslimError
from torchslim.generate import generate_text
from torchslim.recipe import builtin_recipes, load_recipe, parse_recipe, presets
from torchslim.registry import get_stage
from torchslim.tasks import task_class
from torchslim.version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress trained PyTorch models and measure the result honestly.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True)


@app.command()
def run(
    recipe: str = typer.Argument("default", help="a built-in recipe's name or a YAML file"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
):
    """Run a recipe: measure the baseline, run every stage, measure after each, write the report."""

    parsed, folder = load_recipe(recipe)
    run_dir = out_dir or parsed.output or Path("runs") / parsed.name
    report = _run_or_exit(parsed, run_dir, resume, overwrite, folder, f"torchslim run {recipe}")
    if report is not None:
        _print_summary(report, run_dir)


def _run_or_exit(parsed, run_dir: Path, resume: bool, overwrite: bool, folder, command: str) -> dict | None:
    """Run the pipeline; on Ctrl-C say what is kept and how to continue, and exit 130. Under torchrun
    (WORLD_SIZE > 1) this process joins the others; only rank 0 returns the report to print."""
    try:
        distributed.init()
        report = pipeline.run(parsed, run_dir, resume=resume, overwrite=overwrite, search_dir=folder)
        return report if distributed.is_main() else None
    except TorchslimError as exc:
        if not distributed.is_main():
            exc.args = (f"rank {distributed.rank()}: {exc}",) + exc.args[1:]
        raise
    except KeyboardInterrupt:
        err.print(
            f"\nInterrupted. Finished stages and the last epoch checkpoint are kept in {run_dir}; "
            f"continue with: {command} --out {run_dir} --resume"
        )
        raise typer.Exit(130)
    finally:
        distributed.finish()


def _print_summary(report: dict, run_dir: Path) -> None:
    table = Table(title=f"torchslim — {report['recipe']['name']}")
    metric = report.get("task_metric", "accuracy")
    label = metric.replace("_", " ")
    for col in ("#", "stage", label, "params", "size (bytes)", "latency p50 (ms)", "p95 (ms)"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for i, st in enumerate(report["stages"]):
        m = st["metrics"]
        table.add_row(
            str(i),
            st["name"],
            f"{m.get(metric, float('nan')):.4f}",
            f"{m['params']:,}",
            f"{m['size_bytes']:,}",
            f"{m['latency_ms']['p50']:.2f}",
            f"{m['latency_ms']['p95']:.2f}",
        )
    out.print(table)
    s, stages = report["summary"], report["stages"]
    if s and s["reference_stage"] == s["final_stage"] and len(stages) > 1:
        out.print(
            f"no compressing stage in this recipe; baseline → final {label} "
            f"{stages[0]['metrics'].get(metric, float('nan')):.4f} → "
            f"{stages[-1]['metrics'].get(metric, float('nan')):.4f}"
        )
    elif s:
        ref = next(st["metrics"] for st in stages if st["name"] == s["reference_stage"])
        fin = stages[-1]["metrics"]
        out.print(f"{s['final_stage']} vs {s['reference_stage']}:")
        out.print(
            f"  size        {ref['size_bytes'] / 1e6:.3f} MB -> {fin['size_bytes'] / 1e6:.3f} MB "
            f"(-{1 - 1 / s['size_ratio']:.1%}, compression ratio {s['size_ratio']:.2f}x)"
        )
        out.print(f"  parameters  {ref['params']:,} -> {fin['params']:,} (-{1 - 1 / s['param_ratio']:.1%})")
        out.print(
            f"  latency p50 {ref['latency_ms']['p50']:.3f} ms -> {fin['latency_ms']['p50']:.3f} ms "
            f"({s['speedup_stage_measurements']:.2f}x in the stage measurements, {fin['latency_ms']['runtime']}, "
            f"batch {fin['latency_ms']['batch_size']})"
        )
        for shape_label, shape in (report.get("comparison") or {}).get("shapes", {}).items():
            sp = shape["speedup"]
            out.print(
                f"  side by side {shape_label}: {shape['reference_ms']:.3f} -> {shape['final_ms']:.3f} ms, "
                f"{sp['median']:.2f}x faster (quartiles {sp['q25']:.2f}-{sp['q75']:.2f}, {shape['rounds']} "
                "interleaved rounds)",
                soft_wrap=True,
            )
        if fin.get("kernels"):
            k = fin["kernels"]
            out.print(
                f"  kernels     ONNX Runtime runs {k['integer']} compute node(s) on integer kernels, "
                f"{k['float']} in float" + (f", {k['weight_only']} weight-only low-bit" if k["weight_only"] else "")
            )
        if s.get("accuracy_drop") is not None:
            out.print(
                f"  accuracy    {ref['accuracy']:.4f} -> {fin['accuracy']:.4f} "
                f"(drop {100 * s['accuracy_drop']:.2f} points)"
            )
        elif s.get(f"{metric}_drop") is not None:
            low = f" (min {fin['min_cosine']:.4f})" if "min_cosine" in fin else ""
            better = "higher" if report.get("task_metric_higher_is_better", True) else "lower"
            out.print(f"  {label} {ref[metric]:.4f} -> {fin[metric]:.4f}{low} ({better} is better)")
    if s and s.get("epochs_after_reference"):
        out.print(
            f"  training    the final model had {s['epochs_after_reference']} epoch(s) of training after "
            f"'{s['reference_stage']}'; part of the {label} kept may come from that extra training"
        )
    control = report.get("control") or {}
    if control.get("metrics") and metric in control["metrics"]:
        got, fin = control["metrics"][metric], stages[-1]["metrics"][metric]
        out.print(
            f"  control     '{control['reference_stage']}' trained {control['epochs']} more epoch(s) the same "
            f"way: {label} {got:.4f}; final minus control {100 * (fin - got):+.2f} points"
        )
    elif control.get("skipped"):
        out.print(f"  control     not run: {control['skipped']}")
    for sd in (s or {}).get("slowdowns", []):
        out.print(
            f"[bold red]SLOWDOWN:[/] stage '{sd['stage']}' made the model slower than '{sd['after']}' "
            f"({sd['from_ms']:.2f} -> {sd['to_ms']:.2f} ms, {sd['ratio']:.2f}x, {sd['shape']})",
            soft_wrap=True,
        )
    for note in (report.get("comparison") or {}).get("noise", []):
        out.print(
            f"[bold yellow]noisy timing:[/] {note}; re-run on an idle machine before trusting the speedups",
            soft_wrap=True,
        )
    out.print(f"report: {run_dir / 'report.json'} and {run_dir / 'report.html'}")


@app.command()
def auto(
    recipe: str = typer.Argument("default", help="recipe whose model, data and preparing stages to use"),
    max_accuracy_drop: float = typer.Option(0.01, help="validation accuracy the plan may lose (0.01 = 1 point)"),
    objective: str = typer.Option("latency", help="latency or size"),
    time_budget: float = typer.Option(1800, help="seconds the search may take (sensitivity, screening, trials)"),
    max_trials: int = typer.Option(4, help="fine-tuned trials at most"),
    checkpoint: Optional[Path] = typer.Option(
        None,
        help="trained weights for the recipe's model: plan from them instead of running the recipe's preparing stages",
    ),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<name>-auto)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted search in --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
):
    """Plan a compression within an accuracy budget: the recipe's stages up to its first compressing
    one, then the planner, then export. Writes the chosen plan as a re-runnable recipe (plan.yaml)."""

    if objective not in ("latency", "size"):
        raise TorchslimError(f"--objective must be 'latency' or 'size', got {objective!r}.")
    base, folder = load_recipe(recipe)
    data = base.to_dict()
    keep = []
    if checkpoint is not None:
        if not checkpoint.exists():
            raise TorchslimError(f"--checkpoint {checkpoint} does not exist.")
        data["model"]["checkpoint"] = str(checkpoint.resolve())
        data["stages"] = []
    for spec in data["stages"]:
        ((name, _),) = spec.items()
        if get_stage(name).compresses or name == "export":
            break
        keep.append(spec)
    data.update(
        name=f"{base.name}-auto",
        output=None,
        description=f"torchslim auto on the model of '{base.name}'"
        + (f" (weights {checkpoint.name})" if checkpoint else "")
        + f": lowest {objective} within "
        f"{100 * max_accuracy_drop:g} points of validation accuracy, search bounded to {time_budget:g} s.",
        stages=[
            *keep,
            {
                "auto": {
                    "max_accuracy_drop": max_accuracy_drop,
                    "objective": objective,
                    "time_budget_s": time_budget,
                    "max_trials": max_trials,
                }
            },
            {"export": {"format": "all"}},
        ],
    )
    parsed = parse_recipe(data, f"{recipe} (torchslim auto)")
    run_dir = out_dir or Path("runs") / parsed.name
    report = _run_or_exit(parsed, run_dir, resume, overwrite, folder, f"torchslim auto {recipe} (same options)")
    if report is None:
        return
    _print_summary(report, run_dir)
    info = next(st for st in report["stages"] if st["name"] == "auto")["auto"]
    out.print(
        f"planner: {len(info['candidates'])} candidates measured, {len(info['trials'])} fine-tuned, "
        f"search {info['search_seconds']:.0f} s (budget {info['time_budget_s']:.0f} s)"
    )
    out.print(f"plan: {run_dir / 'plan.yaml'} (re-run with: torchslim run {run_dir / 'plan.yaml'})")


def _version(value: bool) -> None:
    if value:
        out.print(f"torchslim {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
):
    """Compress trained PyTorch models and measure the result honestly."""


@app.command()
def recipes(
    show: Optional[str] = typer.Option(
        None, "--show", help="print this built-in recipe's YAML (or a preset's), to copy and edit"
    ),
):
    """List the built-in recipes: the names first, one per line, then a short description of each."""

    found = builtin_recipes()
    if show is not None:
        source = found.get(show) or presets().get(show)
        if source is None:
            import difflib

            near = difflib.get_close_matches(show, [*found, *presets()], n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise TorchslimError(
                f"--show: no built-in recipe or preset '{show}'.{hint} Recipes: "
                f"{', '.join(sorted(found))}; presets: {', '.join(sorted(presets()))}."
            )
        print(source.read_text(), end="")
        return
    for name in sorted(found):
        out.print(name)
    out.print("")
    for name in sorted(found):
        description = (yaml.safe_load(found[name].read_text()) or {}).get("description", "")
        out.print(f"{name}: {description}", soft_wrap=True)


@app.command()
def validate(recipe: str = typer.Argument(..., help="a built-in recipe's name or a YAML file")):
    """Check a recipe without running it: load and validate it (plugins, preset, every stage's settings,
    the stage order), then print the stages a run would execute. Runs nothing; exit 2 on a bad recipe."""

    parsed, folder = load_recipe(recipe)
    task = task_class(parsed.task, folder)
    model = parsed.model.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data = {k: v for k, v in parsed.data.model_dump(mode="json", exclude_defaults=True).items() if v is not None}
    out.print(
        f"recipe '{parsed.name}' is valid: task {task.name}, model {model}, data {data}",
        soft_wrap=True,
        highlight=False,
    )
    out.print(f"run directory: {parsed.output or Path('runs') / parsed.name}", highlight=False)
    out.print("stages (after the baseline measurement):" if parsed.stages else "stages: none (the baseline only)")
    for i, stage in enumerate(parsed.stages, 1):
        settings = stage.config.model_dump(mode="json", exclude_defaults=True)
        summary = get_stage(stage.name, task=task).summary
        out.print(
            f"  {i}. {stage.name} {settings or ''}".rstrip() + (f"  — {summary}" if summary else ""),
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


@app.command()
def analyze(
    recipe: str = typer.Argument("default", help="recipe whose model and data to analyze"),
    model: Optional[str] = typer.Option(None, help="a built-in model instead of the recipe's"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights for the model"),
    batch_size: Optional[int] = typer.Option(None, help="latency batch size (default: recipe)"),
    threads: Optional[int] = typer.Option(None, help="threads (default: recipe)"),
):
    """Show a model's parameters, size, FLOPs, latency and a per-layer table."""

    overrides = {}
    parsed, folder = load_recipe(recipe)
    if model or checkpoint:
        spec = parsed.model.model_dump(exclude_none=True)
        if model:
            spec = {"builtin": model}
        if checkpoint:
            spec["checkpoint"] = str(checkpoint)
        overrides["model"] = spec
    measure = parsed.measure.model_dump()
    measure.update({k: v for k, v in (("batch_size", batch_size), ("threads", threads)) if v})
    overrides["measure"] = measure
    parsed, folder = load_recipe(recipe, overrides)
    analyze_model(parsed, folder, out)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="the folder of a finished causal_lm run"),
    prompt: str = typer.Argument(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy"),
    top_k: int = typer.Option(0, min=0, help="sample among the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="nucleus sampling mass"),
    seed: int = typer.Option(0),
    stage: Optional[str] = typer.Option(None, help="a stage's name or index (default: the last)"),
    threads: int = typer.Option(2, min=1),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
):
    """Continue a prompt with a causal-LM run's served ONNX artifact (key/value cache)."""
    result = generate_text(
        run_dir,
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stage,
        threads,
        chat,
        on_text=lambda text: out.print(text, end="", highlight=False, markup=False),
    )
    out.print("")
    err.print(f"[dim]{len(result['tokens'])} tokens from stage '{result['stage']}' ({result['artifact']})[/]")


STARTER = """\
# A starter recipe written by `torchslim init`. Run it with: torchslim run {path}
name: {name}
model: {{entrypoint: "{entrypoint}"{checkpoint}}}
data: {data}
preset: mobile       # prune 50% in steps, low-rank Linear layers, static int8 (see `torchslim recipes --show mobile`)
# stages: []         # stages of your own run before the preset's, e.g. - train: {{epochs: 3}}
"""


@app.command()
def init(
    entrypoint: str = typer.Argument(..., help="'module:function' that returns your nn.Module"),
    data: Optional[str] = typer.Option(
        None, help="'module:function' returning your datasets (default: the built-in Fashion-MNIST)"
    ),
    checkpoint: Optional[Path] = typer.Option(None, help="your trained weights (.safetensors or .pt)"),
    path: Path = typer.Option(Path("recipe.yaml"), "--out", "-o", help="where to write the recipe"),
    name: Optional[str] = typer.Option(None, help="recipe name (default: the module's name)"),
):
    """Write a starter recipe for your model (checked before it is written)."""
    import re

    if not re.match(PATTERN, entrypoint):
        raise TorchslimError(
            f"'{entrypoint}' is not an entry point; write it as 'module:function', e.g. "
            "mymodel:build for build() in mymodel.py."
        )
    if path.exists():
        raise TorchslimError(f"{path} exists; choose another file with --out, or remove it first.")
    name = name or re.sub(r"[^\w.-]", "-", entrypoint.split(":")[0].split(".")[-1])
    text = STARTER.format(
        path=path,
        name=name,
        entrypoint=entrypoint,
        checkpoint=f", checkpoint: {checkpoint}" if checkpoint else "",
        data=f'{{entrypoint: "{data}"}}' if data else "{builtin: fashion_mnist}",
    )
    parse_recipe(yaml.safe_load(text), path, path.resolve().parent)
    path.write_text(text)
    out.print(f"wrote {path}; run it with: torchslim run {path}")


def main() -> None:
    try:
        app()
    except TorchslimError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk, a file that vanished, a permission taken away mid-run
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(
            f"[bold red]error:[/] {exc.strerror or exc}{where}. Files are written to a temporary name and "
            "renamed, so nothing half-written is left as if complete; free space or fix the permission and "
            "continue with --resume.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The `torchslim` command: run a recipe, analyze a model, list the built-in recipes."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from torchslim import distributed, pipeline, words
from torchslim.analyze import analyze_model
from torchslim.entrypoint import PATTERN, check_exists, user_code_message, user_frames
from torchslim.errors import TorchslimError, os_error_message
from torchslim.generate import generate_text
from torchslim.recipe import builtin_recipes, check_sources, load_recipe, parse_recipe, presets, read_yaml
from torchslim.registry import get_stage
from torchslim.tasks import task_class
from torchslim.version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress trained PyTorch models and measure the result honestly.",
)
# markup off: messages carry user text (paths, shapes like [batch, 10]) that rich would read as tags;
# styled words go in as rich Text
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, markup=False, soft_wrap=True)  # messages unwrapped: commands to copy stay whole


_RESUME: list[str | None] = [None]  # the command that continues the run this process started, for error messages


def _styled(label: str, style: str, text: str) -> Text:
    return Text(label, style=style) + Text(text)


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
    report = _run_or_exit(parsed, run_dir, resume, overwrite, folder, f"torchslim run {shlex.quote(recipe)}")
    if report is not None:
        _print_summary(report, run_dir)


def _run_or_exit(parsed, run_dir: Path, resume: bool, overwrite: bool, folder, command: str) -> dict | None:
    """Run the pipeline; on Ctrl-C say what is kept and how to continue, and exit 130. Under torchrun
    (WORLD_SIZE > 1) this process joins the others; only rank 0 returns the report to print."""
    _RESUME[0] = f"{command} --out {shlex.quote(str(run_dir))} --resume"
    try:
        distributed.init()
        report = pipeline.run(parsed, run_dir, resume=resume, overwrite=overwrite, search_dir=folder)
        return report if distributed.is_main() else None
    except TorchslimError as exc:
        if not distributed.is_main():
            exc.args = (f"rank {distributed.rank()}: {exc}",) + exc.args[1:]
        raise
    except KeyboardInterrupt:
        if (run_dir / pipeline.STATE).exists():
            err.print(
                f"\nInterrupted. Finished stages and the last epoch checkpoint are kept in {run_dir}; "
                f"continue with: {_RESUME[0]}",
                soft_wrap=True,  # the command on one line, to copy
            )
        else:
            again = f"{command} --out {shlex.quote(str(run_dir))}"
            err.print(
                f"\nInterrupted before the run started; nothing was kept. Start it again with: {again}", soft_wrap=True
            )
        raise typer.Exit(130)
    finally:
        distributed.finish()


def _print_summary(report: dict, run_dir: Path) -> None:
    table = Table(title=f"torchslim — {report['recipe']['name']}")
    metric = report.get("task_metric", "accuracy")
    label = metric.replace("_", " ")
    higher = report.get("task_metric_higher_is_better", True)
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
            f"({words.size(ref['size_bytes'], fin['size_bytes'])})"
        )
        out.print(f"  parameters  {ref['params']:,} -> {fin['params']:,} ({words.size(ref['params'], fin['params'])})")
        out.print(
            f"  latency p50 {ref['latency_ms']['p50']:.3f} ms -> {fin['latency_ms']['p50']:.3f} ms "
            f"({words.speed(s['speedup_stage_measurements'])} in the stage measurements, "
            f"{(str(fin['latency_ms']['runtime']))}, "
            f"batch {fin['latency_ms']['batch_size']})"
        )
        for shape_label, shape in (report.get("comparison") or {}).get("shapes", {}).items():
            sp = shape["speedup"]
            out.print(
                f"  side by side {shape_label}: {shape['reference_ms']:.3f} -> {shape['final_ms']:.3f} ms, "
                f"{words.speed(sp['median'])} (speedup quartiles {sp['q25']:.2f}-{sp['q75']:.2f}, "
                f"{shape['rounds']} interleaved rounds)",
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
                f"({words.points(fin['accuracy'] - ref['accuracy'])})"
            )
        elif s.get(f"{metric}_drop") is not None:
            low = f" (min {fin['min_cosine']:.4f})" if "min_cosine" in fin else ""
            better = "higher" if higher else "lower"
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
            f"way: {label} {got:.4f}; the final model is {words.points(fin - got, higher)} than the control"
        )
    elif control.get("skipped"):
        out.print(f"  control     not run: {control['skipped']}")
    for sd in (s or {}).get("slowdowns", []):
        out.print(
            _styled(
                "SLOWDOWN: ",
                "bold red",
                f"stage '{sd['stage']}' made the model slower than '{sd['after']}' ({sd['from_ms']:.2f} -> "
                f"{sd['to_ms']:.2f} ms, {words.speed(1 / sd['ratio'])}, {sd['shape']})",
            ),
            soft_wrap=True,
        )
    for note in (report.get("comparison") or {}).get("noise", []):
        out.print(
            _styled("noisy timing: ", "bold yellow", f"{note}; re-run on an idle machine before trusting the speedups"),
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
    check_sources(parsed, folder)
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
    err.print(
        Text(f"{len(result['tokens'])} tokens from stage '{result['stage']}' ({result['artifact']})", style="dim")
    )


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
    folder = path.resolve().parent
    check_exists(entrypoint, "entrypoint", Path.cwd())  # found, not imported: init runs none of your code
    if data:
        check_exists(data, "--data", Path.cwd())
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise TorchslimError(f"--checkpoint {checkpoint} does not exist (or is not a file).")
        checkpoint = Path(os.path.relpath(checkpoint.resolve(), folder))  # the recipe finds it from its folder
    name = name or re.sub(r"[^\w.-]", "-", entrypoint.split(":")[0].split(".")[-1])
    text = STARTER.format(
        path=path,
        name=name,
        entrypoint=entrypoint,
        checkpoint=f", checkpoint: {json.dumps(str(checkpoint))}" if checkpoint else "",
        data=f'{{entrypoint: "{data}"}}' if data else "{builtin: fashion_mnist}",
    )
    parse_recipe(read_yaml(text, path), path, path.resolve().parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    out.print(f"wrote {path}; run it with: torchslim run {path}")


def main() -> None:
    try:
        app()
    except TorchslimError as exc:
        err.print(_styled("error: ", "bold red", str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk, a read-only folder, a file that vanished mid-run
        if user_frames(exc):
            _user_code_failed(exc)
        err.print(_styled("error: ", "bold red", os_error_message(exc, _RESUME[0])), highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:
        if not user_frames(exc):
            raise  # torchslim's own fault: the traceback is what a bug report needs
        _user_code_failed(exc)


def _user_code_failed(exc: Exception) -> None:
    """Code of the user's (a task's method, a function a plugin calls) raised where torchslim had not
    wrapped the call: name the outermost function of theirs and show their frames only; exit 2."""
    first = user_frames(exc)[0]
    what = f"your function {first.name} ({first.filename}, line {first.lineno})"
    err.print(_styled("error: ", "bold red", user_code_message(what, exc)), highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()

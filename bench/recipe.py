"""Record a recipe run as a result: `torchslim run RECIPE` through the Python API, its report's summary
and per-stage metrics written to bench/results/recipe-<name>.json.

    .venv/bin/python bench/recipe.py                  # the built-in default recipe (what `make run` runs)
    .venv/bin/python bench/recipe.py smoke            # a built-in recipe by name, or a YAML file

The run goes to --run-dir (default runs/bench-<name>, replaced if it exists). Recorded per stage: the
task metric (accuracy for classifiers), parameters, bytes on disk, latency p50/p95 in the measuring
runtime; and the side-by-side comparison every run ends with (all artifacts timed interleaved in one
process: each stage's p50 and the reference-over-final speedup with its quartiles), the summary, and
the control row where the recipe has one."""

from __future__ import annotations

from pathlib import Path

import harness
from torchslim import load_recipe, run


def main() -> None:
    parser = harness.parser(__doc__, threads=None)
    parser.add_argument("recipe", nargs="?", default="default", help="a built-in recipe's name or a YAML file")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-<name>)")
    args = parser.parse_args()
    recipe, folder = load_recipe(args.recipe)
    extra = [args.recipe] if Path(args.recipe).is_file() else []
    result = harness.start(
        args,
        title=f"Built-in recipe `{recipe.name}`" if not extra else f"Recipe {args.recipe}",
        name=f"recipe-{recipe.name}",
        code=extra,
        threads=recipe.measure.threads,
    )
    run_dir = args.run_dir or Path("runs") / f"bench-{recipe.name}"
    report = run(recipe, run_dir, overwrite=True, search_dir=folder)
    record(result, report, run_dir)
    if recipe.description:
        result.note(f"recipe: {recipe.description}")
    result.save()


def record(result: harness.Result, report: dict, run_dir: Path) -> None:
    """The report's stages, comparison, summary and control as the result's tables and headline."""
    metric = report.get("task_metric", "accuracy")
    stages, summary = report["stages"], report.get("summary") or {}
    comparison = report.get("comparison") or {}
    table = result.table(
        "Stages (each measured after it ran)",
        [
            "#",
            "stage",
            "seconds",
            metric,
            "params",
            "bytes",
            "latency p50 (ms)",
            "latency p95 (ms)",
            "runtime",
            "batch",
            "integer / float nodes",
        ],
        [None, None, "{:.0f}", "{:.4f}", "{:,}", "{:,}", "{:.3f}", "{:.3f}", None, None, None],
    )
    for i, st in enumerate(stages):
        m, lat = st["metrics"], st["metrics"].get("latency_ms") or {}
        kernels = m.get("kernels") or {}
        table.add(
            i,
            st["name"],
            st.get("seconds"),
            m.get(metric),
            m.get("params"),
            m.get("size_bytes"),
            lat.get("p50"),
            lat.get("p95"),
            lat.get("runtime"),
            lat.get("batch_size"),
            f"{kernels['integer']} / {kernels['float']}" if kernels else None,
        )
    for label, shape in (comparison.get("shapes") or {}).items():
        side = result.table(
            f"Side by side, {label}: every artifact timed interleaved ({shape['rounds']} rounds, "
            f"{comparison.get('threads')} threads, batch {shape['batch_size']})",
            ["#", "stage", "p50 (ms)", "p95 (ms)"],
            [None, None, "{:.3f}", "{:.3f}"],
        )
        for st in shape["stages"]:
            side.add(st["index"], st["name"], st["p50"], st["p95"])
    if comparison.get("noise"):
        for line in comparison["noise"]:
            result.note(f"timing: {line}")
    if summary:
        final = stages[-1]["metrics"]
        ref = next((st["metrics"] for st in stages if st["name"] == summary.get("reference_stage")), None)
        rows = result.table(
            f"Summary: {summary.get('final_stage')} vs {summary.get('reference_stage')}",
            ["figure", "value"],
            [None, "{:.4g}"],
        )
        for key in (
            "size_ratio",
            "param_ratio",
            "storage_ratio",
            "speedup",
            "speedup_q25",
            "speedup_q75",
            "speedup_source",
            "speedup_stage_measurements",
            f"{metric}_drop",
            "epochs_after_reference",
            "noisy",
        ):
            if summary.get(key) is not None:
                rows.add(key, summary[key])
        if summary.get("reference_stage") != summary.get("final_stage"):
            result.headline("size", summary.get("size_ratio"), "{:.2f}x smaller")
            spread = (
                {"q25": summary["speedup_q25"], "q75": summary["speedup_q75"]}
                if summary.get("speedup_q25") is not None
                else None
            )
            result.headline("speedup" + (" (interleaved)" if spread else ""), summary.get("speedup"), "{:.2f}x", spread)
            if summary.get(f"{metric}_drop") is not None:
                scale, unit = (100, "{:+.2f} points") if metric == "accuracy" else (1, "{:+.4f}")
                result.headline(f"{metric} change", -scale * summary[f"{metric}_drop"], unit)
        elif ref is not None and metric in final:
            result.note("no compressing stage in this recipe: the reference is the final stage")
        if metric in final:
            result.headline(f"final {metric}", final[metric], "{:.4f}")
    control = report.get("control") or {}
    if control.get("metrics") and metric in control["metrics"]:
        c = result.table(
            f"Control: '{control.get('reference_stage')}' trained {control.get('epochs')} more epoch(s)",
            [metric, f"final minus control ({metric})"],
            ["{:.4f}", "{:+.4f}"],
        )
        c.add(control["metrics"][metric], stages[-1]["metrics"][metric] - control["metrics"][metric])
    elif control.get("skipped"):
        result.note(f"control not run: {control['skipped']}")
    result.data.update(
        run_dir=str(run_dir),
        summary=summary,
        environment=report.get("environment"),
        stages=[{"name": st["name"], "seconds": st.get("seconds"), "metrics": st["metrics"]} for st in stages],
        comparison={k: v for k, v in comparison.items() if k != "shapes"}
        | {
            "shapes": {
                label: {k: v for k, v in shape.items()} for label, shape in (comparison.get("shapes") or {}).items()
            }
        },
    )


if __name__ == "__main__":
    main()

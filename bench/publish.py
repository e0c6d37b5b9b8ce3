"""Generate the results pages from bench/results/*.json: nothing in them is typed by hand.

    .venv/bin/python bench/publish.py            # writes docs/results.md, docs/results/<name>.md, README's block
    .venv/bin/python bench/publish.py --check    # exit 1 if any of them differs from what the JSON gives

docs/results.md is the index (one row per result: CPU, date, commit, command, link); every result has
its page docs/results/<name>.md with all its tables; the README's block between the lines
`<!-- results:begin -->` and `<!-- results:end -->` becomes a short table of headline figures.

A result whose commit is older than the last commit that changed the code it measured (src/torchslim,
its script and any paths the script named; `git log -1 -- PATHS`, ancestry by `git merge-base
--is-ancestor`) is shown as measured on an older version of the code, unless the code it measured
(uncommitted at the time) is exactly what that last commit holds (the record's code fingerprint)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = harness.ROOT
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GENERATED = "<!-- generated from bench/results/*.json by `.venv/bin/python bench/publish.py`: do not edit -->"
STALE = "measured on an older version of the code"
# the features that decide which int8 / bf16 kernels run (shown in short CPU names)
NOTABLE = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimddp",
    "i8mm",
    "sve",
)
FIX = ".venv/bin/python bench/publish.py"


# ---------------------------------------------------------------------------------------------- reading


def load(results: Path) -> list[dict]:
    """Every result record, recipe runs first, then by name."""
    records = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        record.setdefault("name", path.stem)
        records.append(record)
    return sorted(records, key=lambda r: (not r["name"].startswith("recipe-"), r["name"]))


def _git_ok(*args: str, root: Path) -> bool:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def status(record: dict, root: Path = ROOT) -> dict:
    """{"stale": bool, "reason": str, "last_change": commit or None} for one record."""
    stamp = record.get("git") or {}
    paths = stamp.get("code_paths") or ["src/torchslim", record.get("script", "")]
    commit = stamp.get("commit")
    last = (harness.git("log", "-1", "--format=%H", "--", *paths, root=root) or "").strip()
    if not last:
        return {"stale": False, "reason": "no commit history for the measured code", "last_change": None}
    if commit and (commit == last or _git_ok("merge-base", "--is-ancestor", last, commit, root=root)):
        return {"stale": False, "reason": "measured on the current code", "last_change": last}
    if stamp.get("code_fingerprint") and stamp["code_fingerprint"] == harness.commit_fingerprint(last, paths, root):
        return {"stale": False, "reason": f"measured on the code committed in {last[:10]}", "last_change": last}
    date = (harness.git("log", "-1", "--format=%cs", last, root=root) or "").strip()
    return {
        "stale": True,
        "last_change": last,
        "reason": f"{STALE}: commit {(commit or '?')[:10]}; {', '.join(paths)} changed since "
        f"(last in {last[:10]}, {date})",
    }


# ---------------------------------------------------------------------------------------------- pieces


def cpu_text(cpu: dict, short: bool = True) -> str:
    features = cpu.get("features") or []
    shown = [f for f in features if f in NOTABLE] if short else features
    return f"{cpu.get('model', '?')} ({', '.join(shown) or 'no AVX2'})" if features else cpu.get("model", "?")


def wall(seconds) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def commit_text(stamp: dict) -> str:
    commit = (stamp.get("commit") or "?")[:10]
    return f"{commit} (uncommitted changes)" if stamp.get("code_dirty") else commit


def headlines(record: dict, limit: int = 3) -> str:
    items = list((record.get("headline") or {}).items())[:limit]
    return "; ".join(f"{name}: **{harness.headline_text(entry)}**" for name, entry in items) or "—"


def title(record: dict) -> str:
    return record["title"] + (" (quick mode)" if record.get("quick") else "")


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|")


# ---------------------------------------------------------------------------------------------- pages


def page(record: dict, state: dict) -> str:
    g, load = record.get("git") or {}, record.get("loadavg") or {}
    lines = [f"# {record['title']}", "", GENERATED, ""]
    if state["stale"]:
        lines += [f"> **Stale: {state['reason']}.** Re-run the command below to refresh it.", ""]
    if record.get("quick"):
        lines += ["> Quick mode (`--quick`): a cheaper configuration than the full benchmark.", ""]
    start, end = (load.get("start") or [None])[0], (load.get("end") or [None])[0]
    cores = record["cpu"].get("cores") or 1
    busiest = max((x for x in (start, end) if x is not None), default=None)
    if busiest is not None and busiest > cores:
        lines += [
            f"> The machine was busy: load average {busiest:.2f} on {cores} cores during the run, so other "
            "work shared the CPU. Timings taken side by side (interleaved) are the ones to compare.",
            "",
        ]
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    lines += [
        "| | |",
        "|---|---|",
        f"| command | {_code(record['command'])} |",
        f"| CPU | {cpu_text(record['cpu'], short=False)}, {record['cpu'].get('cores')} cores |",
        f"| threads | {record.get('threads') if record.get('threads') is not None else '—'} |",
        f"| date | {record['date'].replace('T', ' ').replace('Z', ' UTC')} |",
        f"| commit | {commit_text(g)} |",
        f"| status | {state['reason']} |",
        f"| wall time | {wall(record.get('wall_seconds'))} |",
        f"| load average (1 min) | {harness.cell(start, '{:.2f}')} at start, {harness.cell(end, '{:.2f}')} at end |",
        f"| versions | {versions} |",
        "",
    ]
    if record.get("headline"):
        lines += ["## Headline", ""]
        lines += [f"- {name}: **{harness.headline_text(entry)}**" for name, entry in record["headline"].items()]
        lines.append("")
    for table in record.get("tables") or []:
        lines += [f"## {table['title']}", "", harness.markdown(table), ""]
        if table.get("note"):
            lines += [table["note"], ""]
    if record.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in record["notes"]] + [""]
    if record.get("description"):
        lines += ["## What the script measures", "", "```text", record["description"], "```", ""]
    lines += ["[All results](../results.md)", ""]
    return "\n".join(lines)


def index(records: list[dict], states: dict[str, dict]) -> str:
    lines = [
        "# Results",
        "",
        GENERATED,
        "",
        "Every number on these pages comes from a JSON file under `bench/results/`, written by the benchmark",
        "script (or `bench/recipe.py` for a built-in recipe) that measured it, stamped with the CPU, the",
        "commit, the date and the command. A result measured on an older version of the code than the",
        "current one says so. Regenerate with `.venv/bin/python bench/publish.py`.",
        "",
        "To add a result: run a script in `bench/` (each takes `--threads`, `--out`, `--no-save`, and `--quick`",
        "where it has a cheap mode; `bench/harness.py` prints the CPU banner and writes the JSON), or record a",
        "recipe run with `.venv/bin/python bench/recipe.py RECIPE`; then publish.",
        "",
    ]
    if not records:
        return "\n".join(lines + ["No results yet.", ""])
    lines += [
        "| result | CPU | threads | date | commit | status | wall time | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        state = states[r["name"]]
        lines.append(
            f"| [{title(r)}](results/{r['name']}.md) | {cpu_text(r['cpu'])} | "
            f"{harness.cell(r.get('threads'))} | {r['date'][:10]} | {commit_text(r.get('git') or {})} | "
            f"{'**stale**: ' + STALE if state['stale'] else 'current'} | {wall(r.get('wall_seconds'))} | "
            f"{_code(r['command'])} |"
        )
    return "\n".join(lines + [""])


def readme_block(records: list[dict], states: dict[str, dict]) -> str:
    lines = [GENERATED, "", "| result | headline | CPU | date |", "|---|---|---|---|"]
    for r in records:
        if not r.get("headline"):
            continue
        date = r["date"][:10] + (f" (**stale**: {STALE})" if states[r["name"]]["stale"] else "")
        lines.append(f"| [{title(r)}](docs/results/{r['name']}.md) | {headlines(r)} | {cpu_text(r['cpu'])} | {date} |")
    lines.append("")
    lines.append("All results, with their commands and every table: [docs/results.md](docs/results.md).")
    return "\n".join(lines)


def generate(results: Path = harness.RESULTS, root: Path = ROOT) -> tuple[dict[str, str], str]:
    """({path relative to root: text} of the docs pages, the README block's text)."""
    records = load(results)
    states = {r["name"]: status(r, root) for r in records}
    pages = {"docs/results.md": index(records, states)}
    for r in records:
        pages[f"docs/results/{r['name']}.md"] = page(r, states[r["name"]])
    return pages, readme_block(records, states)


def replace_block(readme: str, block: str) -> str | None:
    """The README with its results block replaced, or None when it lacks the marker lines."""
    lines = readme.split("\n")
    try:
        begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
        end = next(i for i, line in enumerate(lines) if line.strip() == END and i > begin)
    except StopIteration:
        return None
    return "\n".join(lines[: begin + 1] + [block] + lines[end:])


def differences(pages: dict[str, str], block: str, root: Path = ROOT) -> list[str]:
    """The generated files that differ from what is on disk (and stray pages in docs/results/)."""
    out = [p for p, text in pages.items() if not (root / p).is_file() or (root / p).read_text() != text]
    folder = root / "docs" / "results"
    if folder.is_dir():
        out += [str(p.relative_to(root)) for p in sorted(folder.glob("*.md")) if str(p.relative_to(root)) not in pages]
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text()
        new = replace_block(text, block)
        if new is not None and new != text:
            out.append("README.md (results block)")
    return out


def write(pages: dict[str, str], block: str, root: Path = ROOT, readme: Path = ROOT / "README.md") -> None:
    """Write the pages under `root` (removing pages of results that are gone) and `readme` with its
    block replaced to root/README.md; a README without the marker lines is left alone, with a message."""
    folder = root / "docs" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.md"):
        if str(old.relative_to(root)) not in pages:
            old.unlink()
    for path, text in pages.items():
        (root / path).write_text(text)
    print(f"wrote {len(pages)} pages under {root}: " + ", ".join(pages))
    text = readme.read_text() if readme.is_file() else ""
    new = replace_block(text, block)
    if new is None:
        print(
            f"{readme.name} has no lines {BEGIN} and {END}: its headline table was not written "
            f"(add the two lines where the table belongs and run this again)"
        )
    elif new != text or readme != root / "README.md":
        (root / "README.md").write_text(new)
        print("README.md: results block written")
    else:
        print("README.md: results block unchanged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    parser.add_argument("--out", type=Path, default=ROOT, help="write under this folder instead of the repository")
    args = parser.parse_args()
    pages, block = generate()
    if args.check:
        stale = differences(pages, block)
        if stale:
            print("out of date: " + ", ".join(stale) + f"\nregenerate with: {FIX}")
            sys.exit(1)
        print("results pages up to date")
        return
    write(pages, block, args.out)
    stale = [r for r in load(harness.RESULTS) if status(r)["stale"]]
    if stale:
        print(f"{len(stale)} result(s) measured on an older version of the code; to refresh, run (one at a time):")
        for r in stale:
            print(f"  nice -n 5 {r['command']}")


if __name__ == "__main__":
    main()

"""The one harness every script in bench/ uses: common arguments, a CPU banner, and a JSON record.

    import harness
    parser = harness.parser(__doc__, threads=2)            # adds --threads, --out, --no-save (and --quick)
    args = parser.parse_args()
    result = harness.start(args, title="Float runtimes: PyTorch vs ONNX Runtime")
    table = result.table("Latency", ["model", "batch", "p50 (ms)"], formats=[None, None, "{:.3f}"])
    table.add("cnn_teacher", 32, 20.56)
    result.headline("cnn_teacher, batch 32: PyTorch / ONNX Runtime", 1.64, "{:.2f}x")
    result.save()                                           # bench/results/<name>.json

The record (bench/results/<name>.json) is stamped with the CPU (model and instruction-set features),
the threads, the load average before and after, the git commit (and whether the tree had uncommitted
changes, with a fingerprint of the measured code), the UTC date, the exact command, the wall time and
the library versions, beside the script's own data: tables ({title, columns, rows}) and named headline
figures. `bench/publish.py` turns these files into docs/results.md, docs/results/<name>.md and the
README's headline table; no number is typed by hand."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCHEMA = 1
# the stamps every result file carries (tests/test_results.py checks them)
REQUIRED = (
    "schema",
    "name",
    "title",
    "script",
    "command",
    "date",
    "wall_seconds",
    "cpu",
    "threads",
    "loadavg",
    "git",
    "versions",
    "tables",
    "headline",
)
# distributions whose versions are recorded when the script imported them
LIBRARIES = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "numpy": "numpy",
    "transformers": "transformers",
    "torch_pruning": "torch-pruning",
    "llama_cpp": "llama-cpp-python",
    "torchslim": "torchslim",
}


# ---------------------------------------------------------------------------------------------- arguments


def parser(doc: str | None, *, threads: int | None = 2, quick: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the common arguments: --threads (unless `threads` is None: the script
    has no use for it), --out and --no-save, and --quick where the script has a cheap mode (`quick`
    says what it does)."""
    lines = (doc or "").strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0] if lines else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(lines[1:]).strip() or None,
    )
    common = p.add_argument_group("harness (bench/harness.py)")
    if threads is not None:
        common.add_argument("--threads", type=int, default=threads, help=f"CPU threads (default {threads})")
    common.add_argument(
        "--out", type=Path, default=None, help="the result's JSON file (default bench/results/<name>.json)"
    )
    common.add_argument("--no-save", action="store_true", help="print only; write no result file")
    if quick:
        common.add_argument("--quick", action="store_true", help=quick)
    return p


# ---------------------------------------------------------------------------------------------- the machine


def cpu() -> dict:
    """The CPU as every torchslim report records it (model name, instruction-set features, cores)."""
    from torchslim.report.json import environment

    env = environment(threads=1)
    return {"model": env["cpu"], "features": env["cpu_features"], "cores": env["cores"]}


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for module, dist in LIBRARIES.items():
        if module in sys.modules or module in ("torch", "onnxruntime"):
            try:
                out[module] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return out


# ---------------------------------------------------------------------------------------------- git


def git(*args: str, root: Path = ROOT) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def fingerprint(lines: list[str]) -> str:
    return hashlib.sha1("".join(sorted(f"{line}\n" for line in lines)).encode()).hexdigest()


def worktree_fingerprint(paths: list[str], root: Path = ROOT) -> str | None:
    """The measured code as it is on disk (committed or not): a hash of `path blob` over the tracked
    and untracked (not ignored) files under `paths`. Equal to `commit_fingerprint` of a commit whose
    files are the same."""
    listed = git("ls-files", "-co", "--exclude-standard", "-z", "--", *paths, root=root)
    if listed is None:
        return None
    files = sorted({f for f in listed.split("\0") if f and (root / f).is_file()})
    if not files:
        return fingerprint([])
    try:
        done = subprocess.run(
            ["git", "hash-object", "--stdin-paths"],
            cwd=root,
            input="\n".join(files),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    blobs = done.stdout.split()
    if done.returncode != 0 or len(blobs) != len(files):
        return None
    return fingerprint([f"{f} {b}" for f, b in zip(files, blobs)])


def commit_fingerprint(commit: str, paths: list[str], root: Path = ROOT) -> str | None:
    """The same hash for the files under `paths` in `commit`."""
    listed = git("ls-tree", "-r", "-z", "--full-tree", commit, "--", *paths, root=root)
    if listed is None:
        return None
    lines = []
    for entry in filter(None, listed.split("\0")):
        meta, _, path = entry.partition("\t")
        kind, blob = meta.split()[1:3]
        if kind == "blob":
            lines.append(f"{path} {blob}")
    return fingerprint(lines)


def git_stamp(paths: list[str]) -> dict:
    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no")
    code = worktree_fingerprint(paths)
    return {
        "commit": commit,
        "dirty": bool(status.strip()) if status is not None else None,
        "code_paths": paths,
        "code_fingerprint": code,
        "code_dirty": (code != commit_fingerprint(commit, paths)) if commit and code else None,
    }


# ---------------------------------------------------------------------------------------------- values


def plain(value):
    """JSON-safe: numpy scalars and arrays, Paths, tuples; NaN and infinity become null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch scalars and arrays
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def cell(value, fmt: str | None = None) -> str:
    """One table cell as text: `fmt` is a format template ("{:.2f}", "{:,}", "{:.1%}", "{:.2f}x"); a
    spread ({"median", "q25", "q75"}) is shown as 'median (q25-q75)'; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, dict) and "median" in value:
        return f"{cell(value['median'], fmt)} ({cell(value.get('q25'), fmt)}–{cell(value.get('q75'), fmt)})"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if fmt:
            try:
                return fmt.format(value)
            except (ValueError, TypeError):
                pass
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v, fmt) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(table: dict) -> str:
    formats = table.get("formats") or [None] * len(table["columns"])
    lines = ["| " + " | ".join(cell(c) for c in table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    for row in table["rows"]:
        lines.append("| " + " | ".join(cell(v, f) for v, f in zip(row, formats)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the record


class Table:
    def __init__(self, title: str, columns: list[str], formats: list[str | None] | None, note: str | None):
        if formats is not None and len(formats) != len(columns):
            raise ValueError(f"table {title!r}: {len(columns)} columns but {len(formats)} formats")
        self.title, self.columns, self.formats, self.note, self.rows = title, list(columns), formats, note, []

    def add(self, *values) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(self.columns)} columns, row has {len(values)}")
        self.rows.append(list(values))

    def to_dict(self) -> dict:
        out = {"title": self.title, "columns": self.columns, "rows": plain(self.rows)}
        if self.formats:
            out["formats"] = self.formats
        if self.note:
            out["note"] = self.note
        return out

    def print(self) -> None:
        print(f"\n{self.title}\n{markdown(self.to_dict())}")
        if self.note:
            print(self.note)


class Result:
    """One run of one benchmark: what `start` opened, what the script adds, what `save` writes."""

    def __init__(self, args: argparse.Namespace, name: str, title: str, script: Path, code: list[str]):
        self.args, self.name, self.title, self.script = args, name, title, script
        self.tables: list[Table] = []
        self.headlines: dict[str, dict] = {}
        self.notes: list[str] = []
        self.data: dict = {}
        self.started = time.perf_counter()
        self.date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.load_start = loadavg()
        self.threads = getattr(args, "threads", None)
        self.code = sorted({"src/torchslim", _relative(script), *code})
        self.git = git_stamp(self.code)
        self.cpu = cpu()

    def table(
        self, title: str, columns: list[str], formats: list[str | None] | None = None, note: str | None = None
    ) -> Table:
        """A new table of this result (rows hold raw values; `formats` say how to show each column)."""
        table = Table(title, columns, formats, note)
        self.tables.append(table)
        return table

    def headline(self, name: str, value, fmt: str | None = None, spread: dict | None = None) -> None:
        """A named headline figure (the README's table shows these); `spread` is a ratio's
        {median, q25, q75} when the value is an interleaved speedup."""
        entry = {"value": plain(value)}
        if fmt:
            entry["format"] = fmt
        if spread:
            entry["q25"], entry["q75"] = plain(spread.get("q25")), plain(spread.get("q75"))
        self.headlines[name] = entry

    def note(self, text: str) -> None:
        self.notes.append(text)

    def record(self) -> dict:
        return plain(
            {
                "schema": SCHEMA,
                "name": self.name,
                "title": self.title,
                "script": _relative(self.script),
                "command": command(),
                "args": {k: v for k, v in vars(self.args).items() if k not in ("out", "no_save")},
                "quick": bool(getattr(self.args, "quick", False)),
                "date": self.date,
                "wall_seconds": round(time.perf_counter() - self.started, 1),
                "cpu": self.cpu,
                "threads": self.threads,
                "loadavg": {"start": self.load_start, "end": loadavg()},
                "git": self.git,
                "versions": versions(),
                "description": (sys.modules["__main__"].__doc__ or "").strip(),
                "tables": [t.to_dict() for t in self.tables],
                "headline": self.headlines,
                "notes": self.notes,
                "data": self.data,
            }
        )

    def save(self, echo: bool = True) -> Path | None:
        """Print the tables (unless `echo` is False: the script printed them its own way) and the
        headline figures, then write the record (unless --no-save)."""
        record = self.record()
        if echo:
            for table in self.tables:
                table.print()
        if self.headlines:
            print("\nheadline: " + "; ".join(f"{k}: {headline_text(v)}" for k, v in self.headlines.items()))
        print(
            f"\nwall time {record['wall_seconds']:.0f} s; load average {record['loadavg']['start']} -> "
            f"{record['loadavg']['end']}"
        )
        if getattr(self.args, "no_save", False):
            return None
        out = Path(self.args.out) if getattr(self.args, "out", None) else RESULTS / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(f"result: {_relative(out)} (publish with: .venv/bin/python bench/publish.py)")
        return out


def headline_text(entry: dict) -> str:
    text = cell(entry.get("value"), entry.get("format"))
    if entry.get("q25") is not None:
        text += f" ({cell(entry['q25'], entry.get('format'))}–{cell(entry['q75'], entry.get('format'))})"
    return text


def _relative(path) -> str:
    path = Path(path).absolute()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def command() -> str:
    """The command as typed from the repository root: the interpreter, the script, its arguments."""
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.absolute().relative_to(ROOT))
    except ValueError:
        exe_text = "python"
    return shlex.join([exe_text, _relative(Path(sys.argv[0]).absolute()), *sys.argv[1:]])


def banner(result: Result) -> None:
    c, g = result.cpu, result.git
    state = "uncommitted changes" if g.get("dirty") else "clean"
    print(
        f"CPU: {c['model']} ({' '.join(c['features']) or 'features unknown'}), {c['cores']} cores; "
        f"threads {result.threads}; load average {result.load_start}"
    )
    print(f"commit {(g.get('commit') or '?')[:10]} ({state}); {result.date}; {command()}")


def start(
    args: argparse.Namespace, *, title: str, name: str | None = None, code: list[str] = (), threads: int | None = None
) -> Result:
    """Open this run's record and print the CPU banner. `name` is the result file's stem (default the
    script's; a --quick run appends -quick); `code` names paths besides src/torchslim and the script
    that the measurement depends on (staleness is judged against them); `threads` is recorded when the
    script takes its thread count from elsewhere (a recipe). Sets torch's thread count to --threads."""
    script = Path(sys.modules["__main__"].__file__ or sys.argv[0])
    name = name or script.stem
    if getattr(args, "quick", False):
        name += "-quick"
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    result = Result(args, name, title, script, list(code))
    if threads is not None:
        result.threads = threads
    banner(result)
    return result

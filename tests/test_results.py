"""Results are data: every bench/results/*.json carries its stamps, the pages generated from them
(docs/results.md, docs/results/<name>.md, the README's headline block) are up to date, and a result
measured on an older version of the code is shown as such. Runs no benchmark."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import publish  # noqa: E402

RESULTS = sorted((ROOT / "bench" / "results").glob("*.json"))
FIX = "run `.venv/bin/python bench/publish.py` and commit what it writes"


def test_there_are_results():
    assert RESULTS, "bench/results/ holds no result: run a benchmark (e.g. .venv/bin/python bench/runtimes.py)"


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_result_is_stamped(path: Path):
    r = json.loads(path.read_text())
    missing = [k for k in harness.REQUIRED if k not in r]
    assert not missing, f"{path.name} lacks {missing}: write it with bench/harness.py (Result.save)"
    assert r["name"] == path.stem
    assert r["cpu"]["model"] and isinstance(r["cpu"]["features"], list)
    assert re.fullmatch(r"[0-9a-f]{40}", r["git"]["commit"] or ""), "no commit"
    assert isinstance(r["git"]["dirty"], bool)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["date"])
    assert r["script"].startswith("bench/") and r["script"] in r["command"]
    assert r["wall_seconds"] > 0
    assert r["versions"].get("torch") and r["versions"].get("onnxruntime")
    assert r["tables"], f"{path.name} has no table"
    for table in r["tables"]:
        assert table["title"] and table["columns"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
        if table.get("formats"):
            assert len(table["formats"]) == len(table["columns"])


def test_pages_are_up_to_date(tmp_path: Path):
    """Regenerate the pages into a temporary folder and compare them with the committed ones."""
    pages, block = publish.generate()
    publish.write(pages, block, tmp_path, readme=ROOT / "README.md")
    differ = [p for p in pages if not (ROOT / p).is_file() or (ROOT / p).read_text() != (tmp_path / p).read_text()]
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.md")}
    differ += sorted(committed - set(pages))  # a page whose JSON is gone
    readme = (ROOT / "README.md").read_text()
    if publish.replace_block(readme, block) is not None:
        if (tmp_path / "README.md").read_text() != readme:
            differ.append("README.md (the block between <!-- results:begin --> and <!-- results:end -->)")
    assert not differ, f"results pages out of date with bench/results/*.json: {differ}; {FIX}"


def _fake(tmp_path: Path, name: str, commit: str, **git) -> Path:
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    record = {
        "schema": 1,
        "name": name,
        "title": f"Fake {name}",
        "script": "bench/runtimes.py",
        "command": ".venv/bin/python bench/runtimes.py",
        "date": "2026-01-01T00:00:00Z",
        "wall_seconds": 1.0,
        "cpu": {"model": "Test CPU", "features": ["avx2"], "cores": 2},
        "threads": 2,
        "loadavg": {"start": [0.1, 0.1, 0.1], "end": [0.2, 0.1, 0.1]},
        "git": {"commit": commit, "dirty": False, "code_paths": ["bench/runtimes.py", "src/torchslim"], **git},
        "versions": {"torch": "x", "onnxruntime": "y"},
        "tables": [{"title": "t", "columns": ["a", "b"], "rows": [["x", 1.5]], "formats": [None, "{:.2f}"]}],
        "headline": {"speed": {"value": 1.5, "format": "{:.2f}x"}},
    }
    (folder / f"{name}.json").write_text(json.dumps(record))
    return folder


def _git(*args: str) -> str:
    out = harness.git(*args)
    if out is None:
        pytest.skip("no git history here")
    return out.strip()


def test_a_result_older_than_its_code_is_marked_stale(tmp_path: Path):
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[-1]
    head = _git("rev-parse", "HEAD")
    if first == _git("log", "-1", "--format=%H", "--", "src/torchslim", "bench/runtimes.py"):
        pytest.skip("the code never changed after the first commit")
    folder = _fake(tmp_path, "old", first)
    _fake(tmp_path, "new", head)
    pages, block = publish.generate(folder)
    old, new = pages["docs/results/old.md"], pages["docs/results/new.md"]
    assert publish.STALE in old and publish.STALE not in new
    index_rows = {line.split("](")[0]: line for line in pages["docs/results.md"].splitlines() if "](results/" in line}
    assert publish.STALE in index_rows["| [Fake old"] and publish.STALE not in index_rows["| [Fake new"]
    readme_rows = {line.split("](")[0]: line for line in block.splitlines() if "](docs/results/" in line}
    assert publish.STALE in readme_rows["| [Fake old"] and publish.STALE not in readme_rows["| [Fake new"]
    assert "1.50x" in block  # the headline figure comes from the JSON


def test_uncommitted_code_that_was_then_committed_is_current(tmp_path: Path):
    """A run on a dirty tree stamps the code's fingerprint: if the last commit that changed the code
    holds exactly that code, the result is current although its commit is older."""
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[-1]
    paths = ["bench/runtimes.py", "src/torchslim"]
    last = _git("log", "-1", "--format=%H", "--", *paths)
    folder = _fake(tmp_path, "rescued", first, code_fingerprint=harness.commit_fingerprint(last, paths))
    assert not publish.status(json.loads((folder / "rescued.json").read_text()))["stale"]
    folder = _fake(tmp_path, "other", first, code_fingerprint="0" * 40)
    assert publish.status(json.loads((folder / "other.json").read_text()))["stale"]


def test_readme_without_markers_is_left_alone(tmp_path: Path, capsys):
    folder = _fake(tmp_path, "new", _git("rev-parse", "HEAD"))
    pages, block = publish.generate(folder)
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nno markers here\n")
    publish.write(pages, block, tmp_path / "out", readme=readme)
    assert readme.read_text() == "# project\n\nno markers here\n"
    assert "results:begin" in capsys.readouterr().out
    text = f"a\n{publish.BEGIN}\nold\n{publish.END}\nb\n"
    assert publish.replace_block(text, "new") == f"a\n{publish.BEGIN}\nnew\n{publish.END}\nb\n"


def test_harness_writes_the_stamps(tmp_path: Path, monkeypatch):
    out = tmp_path / "x.json"
    args = argparse.Namespace(threads=2, out=out, no_save=False)
    result = harness.Result(args, "x", "A test", ROOT / "bench" / "runtimes.py", [])
    table = result.table("numbers", ["name", "value", "spread"], [None, "{:.2f}", "{:.2f}x"])
    table.add("a", 1.234, {"median": 2.0, "q25": 1.9, "q75": 2.1})
    table.add("b", float("nan"), None)
    result.headline("speed", 2.0, "{:.2f}x", {"q25": 1.9, "q75": 2.1})
    assert result.save() == out
    record = json.loads(out.read_text())
    assert not [k for k in harness.REQUIRED if k not in record]
    assert record["tables"][0]["rows"][1] == ["b", None, None]
    assert harness.markdown(record["tables"][0]).splitlines()[2] == "| a | 1.23 | 2.00x (1.90x–2.10x) |"
    assert harness.headline_text(record["headline"]["speed"]) == "2.00x (1.90x–2.10x)"
    shutil.rmtree(tmp_path / "results", ignore_errors=True)

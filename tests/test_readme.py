"""The README is the front door: short, and every snippet in it runs or validates, in order, as a
reader following along would (Python runs in one namespace, files a snippet names with a first line
`# name.py` / `# name.yaml` are written to a scratch directory, YAML recipes are validated by
torchslim's loader, `torchslim` and `make` lines are checked against the CLI and the Makefile). The
checks are tests/test_docs.py's; the docs pages the README's old sections moved to are tested there,
with the claims this file used to check (a recipe run's accuracy, the pruned model's size, the int8
encoder's cosine, the user task class, the weight files)."""

import re
from pathlib import Path

import torch

from test_docs import Reader, snippets

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "README.md is the front door: at most 300 lines; move detail to docs/"
    assert len(snippets(text)) >= 6
    for marker in ("<!-- results:begin -->", "<!-- results:end -->"):  # bench/publish.py fills what is between
        assert text.count(marker) == 1 and f"\n{marker}\n" in text, marker
    for title in ("your own CNN", "a Hugging Face encoder", "a Hugging Face decoder LM"):
        section = text.split(f"## Quickstart: {title}")[1].split("\n## ")[0]
        assert "Out comes" in section, f"the quickstart '{title}' ends in what comes out"


def test_every_link_and_picture_in_the_readme_exists():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(t.endswith(".png") for t in targets), "one picture"
    for target in targets:
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"


def test_every_snippet_in_the_readme_runs_or_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = Reader("README.md", tmp_path).check(README.read_text())
    model = namespace["build"]()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "mymodel.py").is_file()

"""Every Python snippet of the README runs as written, in order, in one namespace (later snippets use
what earlier ones defined, as a reader following along would), in a scratch directory."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(snippets()) >= 6


def test_every_python_snippet_in_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(snippets()):
        first = code.strip().splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):  # a file the reader writes, e.g. "# mymodel.py"
            (tmp_path / first[2:].strip()).write_text(code)
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"README python snippet {i + 1} fails: {type(exc).__name__}: {exc}\n{code}")
    # what the snippets claim, checked
    import torch
    assert namespace["report"]["stages"][-1]["metrics"]["accuracy"] > 0.5
    assert sum(p.numel() for p in namespace["small"].parameters()) < 0.5 * sum(
        p.numel() for p in namespace["cnn_teacher"]().parameters())
    assert namespace["info"]["cosine"] >= 0.99 or not namespace["info"]["target_met"]
    model = namespace["build"]()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert issubclass(namespace["Regression"], namespace["LabelledTask"])
    assert os.path.exists("small.safetensors") and os.path.exists("sparse.safetensors")

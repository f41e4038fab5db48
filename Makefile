# Two entry points for a fresh machine: `make demo` and `make test`. Both install what they need first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: demo test test-quick install vllm-env test-vllm

install: $(STAMP)

# torch is pinned here, not in pyproject, so the GPU image keeps its own CUDA build (see Dockerfile).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreamfleet demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The quick subset while iterating: everything but the tests marked slow (and the vLLM ones, which need their rig).
test-quick: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not vllm"

# The vLLM engine's tests run in a second environment with vLLM's CPU backend (tests/vllm_rig/setup.sh says why
# it is separate); `make test` deselects them.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml tests/vllm_rig/setup.sh
	tests/vllm_rig/setup.sh $(VLLM_VENV)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest -q -m vllm

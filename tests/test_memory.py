"""The memory plan (eval.py memory): parameter counts from a config alone, the per-GPU rules, the printed table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "tie_word_embeddings": False, "max_position_embeddings": 40960}  # Qwen3-8B's published config


@pytest.fixture()
def qwen3_8b(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    return tmp_path / "config.json"


def test_shape_counts_the_parameters_without_weights(tiny_model, qwen3_8b):
    from transformers import AutoModelForCausalLM

    import memory
    tiny = memory.model_shape(tiny_model)
    real = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert tiny.parameters == sum(p.numel() for p in real.parameters())  # the tied LM head once
    assert tiny.layer == sum(p.numel() for p in real.model.layers[0].parameters()) and tiny.layers == 2
    big = memory.model_shape(str(qwen3_8b))  # a config.json path; the folder works too
    H, I, V, kv = 4096, 12288, 151936, 8 * 128
    layer = H * H * 2 + 2 * H * kv + 3 * H * I + 2 * H + 2 * 128  # q, o, k, v, MLP, 2 norms, q/k norms
    assert big.layer == layer and big.parameters == 36 * layer + 2 * V * H + H  # untied embedding and LM head, final norm
    assert round(big.parameters / 1e9, 2) == 8.19
    value = memory.model_shape(str(qwen3_8b.parent), value_head=True)  # PPO's critic: the body and one output
    assert value.parameters == big.parameters - V * H + H + 1 and value.vocab == 0


def test_rules_per_gpu(qwen3_8b):
    import memory
    s = memory.model_shape(str(qwen3_8b))
    assert memory.trainer_state(s, 8) == 16 * s.parameters / 8  # fp32 weights + AdamW + fp32 grads, sharded
    full = memory.update_peak(s, 4 * 2560, 4 * 2048, checkpointing=False)
    ckpt = memory.update_peak(s, 4 * 2560, 4 * 2048, checkpointing=True)
    assert ckpt["activations kept for backward"] < full["activations kept for backward"] / 10
    assert full["logits (response tokens x vocab)"] == 4 * 2048 * 151936 * memory.LOGIT_BYTES


def test_eval_memory_prints_the_table(qwen3_8b):
    run = lambda *flags: subprocess.run([sys.executable, str(ROOT / "eval.py"), "memory", "--model", str(qwen3_8b), *flags],  # noqa: E731
                                        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grpo = run("--world", "8")
    assert grpo.returncode == 0, grpo.stderr[-2000:]
    assert "| generate | actor update | sync |" in grpo.stdout and "judge" not in grpo.stdout
    assert "| actor: fp32 weights + AdamW + fp32 grads (shard) | 16.4 | 16.4 | 16.4 |" in grpo.stdout
    assert "DOES NOT FIT: actor update" in grpo.stdout  # micro-batches of 4 x 2560 tokens without checkpointing
    genac = run("--algo", "genac", "--world", "8", "--gradient-checkpointing", "--micro-batch-size", "1", "--gpu-memory-utilization", "0.25")
    assert genac.returncode == 0, genac.stderr[-2000:]
    assert "| judge |" in genac.stdout and "critic engine (vLLM): always awake | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 |" in genac.stdout
    assert "\nfits: " in genac.stdout
    missing = run("--model", "/nonexistent/config.json")
    assert missing.returncode != 0 and "error:" in missing.stderr

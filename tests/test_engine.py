"""Real vLLM + the real model: after a weight sync (streamed, a bucket at a time), engine log-probs match the
trainer's (fp32), at T = 1 and T = 0.7."""
import pytest
import torch

from data import format_prompt, load_problems
from rollout import build_rollout_batch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash install_cpu.sh)")


def test_weight_sync_makes_engine_and_trainer_logprobs_agree(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import actor
    from engine import VLLMEngine
    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    engine = VLLMEngine(default_model, dtype="float32", max_model_len=512)
    # Change the trainer's weights (as an optimizer step would), then sync them into the engine.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # the embedding is the tied LM head too
            if "layers.3." in name or "layers.20." in name or "embed_tokens" in name:
                p.add_(0.02 * torch.randn_like(p))
    problems = load_problems("arithmetic", "heldout")[:4]
    prompts = [format_prompt(tok, p) for p in problems]

    def mean_abs_diff(temperature=1.0):
        samples = engine.generate(prompts, 2, 24, temperature, 1.0, seed=3)
        batch = build_rollout_batch(prompts, samples, [0.0] * 8, tok.pad_token_id)
        with torch.no_grad():
            lp, _, _ = actor.policy_forward(model, batch, temperature=temperature)
        m = batch.response_mask
        return float(((lp - batch.engine_logprobs).abs() * m).sum() / m.sum())

    before = mean_abs_diff()
    engine.load_weights(actor.stream_full_parameters(model, bucket_mb=16, dtype=engine.dtype))  # as the loop syncs
    after, after_tempered = mean_abs_diff(), mean_abs_diff(0.7)
    engine.close()
    assert after < 1e-3, after
    assert after_tempered < 1e-3, after_tempered  # both sides are log softmax(logits / T) of the sampled token
    assert before > 10 * after  # the sync is what made them agree


def test_loading_fp32_weights_into_a_bf16_engine_does_not_flood_the_console(tiny_model):
    """The fp32 master weights cast to the bf16 engine is asked for: vLLM's per-weight warning about it is dropped
    (a default run opened with 122 such lines); other load warnings still show."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = ("from engine import VLLMEngine; e = VLLMEngine(%r, dtype='bfloat16', max_model_len=128); "
            "e.generate([[1, 2, 3]], 1, 2, 1.0, 1.0, 0); e.close()" % tiny_model)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Attempted to load weight" not in proc.stdout + proc.stderr

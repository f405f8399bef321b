"""Real vLLM + the real model: after a weight sync, engine log-probs match the trainer's (fp32), at T = 1 and T = 0.7."""
import pytest
import torch

from rollout import build_rollout_batch, format_prompt, load_problems

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash install_cpu.sh)")


def test_weight_sync_makes_engine_and_trainer_logprobs_agree(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import actor
    from rollout import VLLMEngine
    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    engine = VLLMEngine(default_model, dtype="float32", max_model_len=512)
    # Change the trainer's weights (as an optimizer step would), then sync them into the engine.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.3." in name or "layers.20." in name:
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
    engine.load_weights(actor.full_state_dict(model).items())
    after, after_tempered = mean_abs_diff(), mean_abs_diff(0.7)
    engine.close()
    assert after < 1e-3, after
    assert after_tempered < 1e-3, after_tempered  # both sides are log softmax(logits / T) of the sampled token
    assert before > 10 * after  # the sync is what made them agree

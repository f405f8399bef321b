"""The GPU trainer rehearsed on the CPU (tools/rehearse.py): every algorithm's trainer phases run at world 8 on fake
tensors with the CUDA choices (bf16 mixed precision, the plan's defaults), measured by FSDPMemTracker, and the memory
plan agrees with the tracker. Qwen3-8B's widths (hidden 4096, vocabulary 151936) with 4 of its 36 layers, at the
paper's lengths (512 + 2048 tokens), on an 80 GB card: the regime the plan is for, in seconds per algorithm."""

import json

import pytest
import torch

from flags import ALGORITHMS

SMALL_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
               "intermediate_size": 12288, "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960}
SIZES = ["--max-prompt-tokens", "512", "--max-new-tokens", "2048"]
GPU_GB = 80.0


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-small")
    (folder / "config.json").write_text(json.dumps(SMALL_QWEN3))
    return str(folder)


@pytest.fixture(scope="module")
def rehearsals(small_config):
    from tools.rehearse import rehearse
    return {algo: rehearse(small_config, algo, 8, GPU_GB, SIZES) for algo in ALGORITHMS}


@pytest.mark.slow  # ~2-3 min: seven rehearsals
def test_every_algorithm_rehearses_and_the_plan_agrees_with_the_tracker(rehearsals):
    """Each phase within 10% of the tracker; the plan's trainer state (fp32 shard + AdamW m, v) equals what the
    tracker holds as sharded parameters and optimizer states after two iterations."""
    from tools.rehearse import GB, render
    for algo, result in rehearsals.items():
        table = render(result, GPU_GB)
        assert set(result["phases"]) >= {"actor update", "sync"}, algo
        assert ("critic update" in result["phases"]) == (algo in ("ppo", "vcppo", "genac")), algo
        for phase, m in result["phases"].items():
            assert abs(m["plan"] / m["tracker"] - 1) <= 0.10, (algo, phase, m["plan"] / GB, m["tracker"] / GB)
        kinds = result["phases"]["sync"]["kinds"]
        state = next(cells["sync"] for name, cells in result["rows"] if name.startswith("actor: fp32 weights"))
        assert abs((kinds["SHARDED_PARAM"] + kinds["OPT"]) / state - 1) < 0.02, (algo, kinds)
        assert table.splitlines()[-1].startswith("rehearsal: worst |plan/tracker - 1| = "), table
        assert result["worst"] <= 0.10 and result["least_free"] >= 8.0, (algo, table)


def test_the_meta_built_model_gets_the_bf16_policy_for_a_cuda_target(small_config):
    """load_actor at world 8 builds on the meta device: the policy follows --dtype and the target, not a tensor's
    device (bf16 parameters, fp32 gradient reduction); a CPU target and --dtype fp32 keep it off."""
    from types import SimpleNamespace
    from unittest import mock

    import actor
    from tools.rehearse import FakeLargeTensors, fake_process_group, weights_from_config
    fake_process_group(8)
    try:
        with FakeLargeTensors(), mock.patch.object(actor, "read_full_state_dict", weights_from_config):
            for dtype, target, expected in (("bf16", "cuda", torch.bfloat16), ("bf16", "cpu", None),
                                            ("fp32", "cuda", None)):
                args = SimpleNamespace(dtype=dtype, gradient_checkpointing=False)
                model = actor.load_actor(small_config, torch.device("cpu"), 8, args, target=target)
                for module in (model, model.model.layers[0]):
                    policy = module._get_fsdp_state()._mp_policy
                    assert policy.param_dtype == expected, (dtype, target)
                    assert policy.reduce_dtype == (torch.float32 if expected else None)
    finally:
        torch.distributed.destroy_process_group()


def test_share_prompts_follows_the_target_device():
    import memory
    assert memory.share_prompts_default("cpu") and not memory.share_prompts_default("cuda")

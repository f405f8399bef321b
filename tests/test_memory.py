"""The memory plan (eval.py memory): parameter counts from a config alone, the per-GPU rules, the printed table."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}  # Qwen3-8B's published config


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
    H, ffn, V, kv = 4096, 12288, 151936, 8 * 128
    layer = H * H * 2 + 2 * H * kv + 3 * H * ffn + 2 * H + 2 * 128  # q, o, k, v, MLP, 2 norms, q/k norms
    assert (
        big.layer == layer and big.parameters == 36 * layer + 2 * V * H + H
    )  # untied embedding and LM head, final norm
    assert round(big.parameters / 1e9, 2) == 8.19
    value = memory.model_shape(str(qwen3_8b.parent), value_head=True)  # PPO's critic: the body and one output
    assert value.parameters == big.parameters - V * H + H + 1 and value.vocab == 0


def test_rules_per_gpu(qwen3_8b):
    import memory

    s = memory.model_shape(str(qwen3_8b))
    assert memory.trainer_state(s, 8) == 12 * s.parameters / 8  # fp32 weights + AdamW, sharded: every phase
    assert memory.gradients(s, 8) == 4 * s.parameters / 8  # fp32 gradients: only in the update (freed after it)
    assert s.largest == 151936 * 4096  # the embedding (= the untied LM head): the sync gathers it alone
    full = memory.update_peak(s, 4 * 2560, 4 * 2048, checkpointing=False)
    ckpt = memory.update_peak(s, 4 * 2560, 4 * 2048, checkpointing=True)
    assert ckpt["activations kept for backward"] < full["activations kept for backward"] / 10
    assert full["logits kept for backward (fp32, response tokens x vocab)"] == 4 * 2048 * 151936 * 4
    assert full["backward transient: logits' temporaries or 2 layers in flight"] == 4 * 2048 * 151936 * 16
    value = memory.update_peak(memory.model_shape(str(qwen3_8b), value_head=True), 4 * 2560, 0, checkpointing=False)
    assert value["backward transient: logits' temporaries or 2 layers in flight"] == 12 * s.layer  # no LM head
    # vLLM's profiling peak: the sampler's [max_num_seqs, vocab] fp32 copies dominate at its GPU default of 1024 rows
    assert (
        memory.engine_profile_peak(s, 1024, 16384)
        > 5 * memory.GB
        > 2 * memory.GB
        > memory.engine_profile_peak(s, 256, 8192)
    )


def plan_for(config, algo: str, gpu_gb: float, **flags):
    import memory

    args = SimpleNamespace(
        model=str(config),
        critic=None,
        algo=algo,
        world=8,
        gpu_gb=gpu_gb,
        prompt_tokens=512,
        response_tokens=2048,
        critic_new_tokens=1024,
        sync_bucket_mb=64.0,
        segment_tokens=120,
        pack_critic_states=True,
        micro_batch_size=None,
        gradient_checkpointing=None,
        gpu_memory_utilization=None,
        engine_max_num_seqs=None,
        engine_max_num_batched_tokens=None,
    )
    vars(args).update(flags)
    memory.choose_defaults(args)
    rows, facts = memory.plan(args)
    return args, rows, facts, memory.totals(rows, facts["phases"])


@pytest.mark.parametrize("gpu_gb", [80.0, 141.0])
@pytest.mark.parametrize("algo", ["genac", "ppo", "poise"])
def test_qwen3_8b_fits_every_phase_at_the_defaults(qwen3_8b, algo, gpu_gb):
    """The paper profile on 8 GPUs: the defaults chosen from the plan leave >= 8 GB in every phase, with a KV cache
    that holds many full-length sequences."""
    import memory

    args, rows, facts, total = plan_for(qwen3_8b, algo, gpu_gb)
    for phase in facts["phases"]:
        assert gpu_gb * memory.GB - total[phase] >= memory.MARGIN_GB * memory.GB, (phase, total[phase] / memory.GB)
    assert facts["kv_sequences"] >= 32 and 0.05 <= args.gpu_memory_utilization <= 0.85
    assert memory.verdict(rows, facts)[0]
    if (
        algo == "genac"
    ):  # one engine: the judge holds the critic's weights, nothing of the engine is on the GPU in the updates
        engine_rows = [cells for name, cells in rows if name.startswith("engine:")]
        assert all(not cells.get(p) for cells in engine_rows for p in ("actor update", "critic update"))
        assert "judge" in facts["phases"]


def test_a_plan_that_does_not_fit_names_the_phase_the_bytes_and_the_flag(qwen3_8b):
    import memory

    _, rows, facts, total = plan_for(
        qwen3_8b, "grpo", 80.0, micro_batch_size=8, gradient_checkpointing=False, gpu_memory_utilization=0.5
    )
    fits, line = memory.verdict(rows, facts)
    over = (total["actor update"] - 80 * memory.GB) / memory.GB
    assert not fits and "actor update" in line and "--micro-batch-size" in line and f"{over:.1f} GB over" in line
    _, rows, facts, total = plan_for(qwen3_8b, "grpo", 80.0, gpu_memory_utilization=0.95)
    fits, line = memory.verdict(rows, facts)
    assert not fits and line.startswith("DOES NOT FIT: generate") and "--gpu-memory-utilization" in line


@pytest.mark.slow  # starts processes that import torch / train.py
def test_eval_memory_prints_the_table(qwen3_8b):
    run = lambda *flags: subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "memory", "--model", str(qwen3_8b), *flags],  # noqa: E731
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    grpo = run("--world", "8", "--micro-batch-size", "4", "--no-gradient-checkpointing")
    assert grpo.returncode == 0, grpo.stderr[-2000:]
    assert "| generate | actor update | sync |" in grpo.stdout and "judge" not in grpo.stdout
    assert "| actor: fp32 weights + AdamW (shard) | 12.3 | 12.3 | 12.3 |" in grpo.stdout
    assert "| actor: fp32 gradients (shard; freed after its update) | - | 4.1 | - |" in grpo.stdout
    assert "| sync: largest single tensor, bf16 (gathered alone) | - | - | 1.2 |" in grpo.stdout
    assert "DOES NOT FIT: actor update" in grpo.stdout  # micro-batches of 4 x 2560 tokens without checkpointing
    genac = run("--algo", "genac", "--world", "8")
    assert genac.returncode == 0, genac.stderr[-2000:]
    assert "| judge |" in genac.stdout and "engine: profiling peak" in genac.stdout and "\nfits: " in genac.stdout
    assert "chosen from the plan: micro_batch_size, gradient_checkpointing, gpu_memory_utilization" in genac.stdout
    missing = run("--model", "/nonexistent/config.json")
    assert missing.returncode != 0 and "error:" in missing.stderr


def test_train_stops_before_loading_a_model_when_the_plan_does_not_fit(tiny_model, tmp_path):
    """A model folder with its config and tokenizer but NO weights: the plan reads only the config, so a run whose plan
    does not fit stops with the plan's message (not a missing-weights error), rc != 0, nothing written."""
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        str(folder),
        "--out",
        str(tmp_path / "run"),
        "--gpu-gb",
        "5",
        "--gpu-memory-utilization",
        "0.4",  # 2 GB: the engine's weights, profiling peak and 1 GB of CUDA graphs, then a KV cache
        "--micro-batch-size",
        "512",
        "--max-new-tokens",
        "1024",
        "--no-eval",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode != 0
    assert (
        "DOES NOT FIT: actor update" in proc.stderr and "--micro-batch-size" in proc.stderr and "GB over" in proc.stderr
    )
    assert not (tmp_path / "run" / "run.json").exists()
    fits = subprocess.run(
        cmd[:-7] + ["--gpu-gb", "80", "--steps", "0", "--no-eval"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (
        "[plan] 1 x 80 GB: fits" in fits.stderr
    )  # the same folder passes the plan, then fails where the weights are read
    assert fits.returncode != 0 and "DOES NOT FIT" not in fits.stderr


def train_flags(config, algo: str):
    """train.py's parsed flags as the plan reads them, every planned flag and --share-prompts left unset."""
    import memory

    args = SimpleNamespace(model=str(config), algo=algo, max_prompt_tokens=512, max_new_tokens=2048,
                           sync_bucket_mb=64.0, margin_gb=8.0, share_prompts=None, critic_max_new_tokens=1024,
                           segment_tokens=120, pack_critic_states=True, **dict.fromkeys(memory.PLANNED_FLAGS))
    if algo != "genac":
        del args.critic_max_new_tokens, args.segment_tokens
    return args


def test_run_plan_reads_its_args_and_returns_the_chosen_flags(qwen3_8b):
    """run_plan writes nothing into the flags it is given: it returns the value of each planned flag and of
    --share-prompts, the plan's choice for those left unset (on a CPU target the engine's batch limits stay unset)."""
    import memory
    from flags import ENGINE_MAX_NUM_SEQS

    args = train_flags(qwen3_8b, "grpo")
    before = dict(vars(args))
    line, planned = memory.run_plan(args, 8, 80.0, None, target="cuda")
    assert vars(args) == before
    chosen, *_ = plan_for(qwen3_8b, "grpo", 80.0)  # choose_defaults on the same inputs
    assert planned == {**{k: getattr(chosen, k) for k in memory.PLANNED_FLAGS}, "share_prompts": False}
    assert planned["micro_batch_size"] == 1 and planned["engine_max_num_seqs"] == ENGINE_MAX_NUM_SEQS
    assert f"--micro-batch-size {planned['micro_batch_size']} " in line
    cpu_line, on_cpu = memory.run_plan(args, 8, None, None, target="cpu")
    assert vars(args) == before
    assert on_cpu == {**memory.CPU_DEFAULTS, "engine_max_num_seqs": None, "engine_max_num_batched_tokens": None,
                      "share_prompts": True}
    resumed = train_flags(qwen3_8b, "grpo")
    resumed.model = None  # train.py's --model left unset: the plan reads the folder it resolved (model_path)
    assert memory.run_plan(resumed, 8, None, None, "cpu", model_path=str(qwen3_8b)) == (cpu_line, on_cpu)


@pytest.mark.parametrize("algo", ["grpo", "genac"])
def test_train_and_eval_memory_print_the_same_plan_for_the_same_card(qwen3_8b, algo, capsys):
    """train.py's [plan] line names the eval.py memory command of its table; that command, run, reaches the same
    verdict with the same chosen flags (an H100's reported 85.5 GB: `--gpu h100`)."""
    import shlex

    import memory
    line, planned = memory.run_plan(train_flags(qwen3_8b, algo), 8, memory.CARD_GB["h100"], None, target="cuda")
    command = shlex.split(line.split("the same table: ")[1])
    assert command[:3] == ["python", "eval.py", "memory"]
    memory.memory_main(command[3:])
    table = capsys.readouterr().out
    verdict = line.split(": ", 1)[1].split("; per phase")[0]
    assert table.splitlines()[-2 if "chosen from the plan" in table else -1] == verdict, (verdict, table[-400:])
    assert f"--micro-batch-size {planned['micro_batch_size']} " in table

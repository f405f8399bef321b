"""Resume: 4 steps straight == 2 steps + resume + 2 steps (fp32 weights within 1e-5, same metrics),
with the resume point on an epoch boundary of a 4-problem data set; under torchrun too, killed with SIGKILL mid-step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("reward", "response_length", "generated_tokens", "policy_loss", "clip_frac", "grad_norm", "entropy",
            "adv_mean")


def train_command(out, model, data, steps, engine, extra=(), ranks=1):
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={ranks}", f"--master_port={_free_port()}"]
    return [*launcher, str(ROOT / "train.py"), "--model", model, "--data", data, "--out", str(out),
            "--steps", str(steps), "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8",
            "--dtype", "fp32", "--engine", engine, "--engine-dtype", "float32", "--no-eval", "--save-every", "2",
            "--micro-batch-size", "2", *extra]


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(out, model, data, steps, engine, extra=(), ranks=1):
    cmd = train_command(out, model, data, steps, engine, extra, ranks)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_resume_continues_exactly(tiny_model, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(4)))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, tiny_model, str(data), 4, engine)
    run_train(resumed, tiny_model, str(data), 2, engine)
    with open(resumed / "metrics.jsonl", "a") as f:  # as if killed after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "reward": 99.0}) + "\n")
    proc = run_train(resumed, tiny_model, str(data), 4, engine, ["--resume"])
    assert "[resume] from" in proc.stderr and "step 2" in proc.stderr
    a = load_file(straight / "checkpoint-000004" / "model.safetensors")
    b = load_file(resumed / "checkpoint-000004" / "model.safetensors")
    start = load_file(Path(tiny_model) / "model.safetensors")
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-6  # training moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rows_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]  # the orphaned step-3 line is gone, not counted twice
    for ra, rb in zip(rows_a, rows_b):
        for key in COMPARED:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    state = torch.load(resumed / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    assert state["stream"] == {"epoch": 1, "position": 4}  # crossed the epoch boundary at the resume point


def test_resume_with_critic_continues_exactly(tiny_model, tmp_path):
    """PPO's critic (weights in checkpoint-N/critic, its optimizer in trainer_state.pt) resumes exactly too."""
    pytest.importorskip("vllm")
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(4)))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--algo", "ppo", "--critic-lr", "1e-3"]
    run_train(straight, tiny_model, str(data), 4, "vllm", extra)
    run_train(resumed, tiny_model, str(data), 2, "vllm", extra)
    run_train(resumed, tiny_model, str(data), 4, "vllm", extra + ["--resume"])
    for part in ("model.safetensors", "critic/model.safetensors"):
        a = load_file(straight / "checkpoint-000004" / part)
        b = load_file(resumed / "checkpoint-000004" / part)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (part, k)
    rows_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows_a, rows_b):
        for key in COMPARED + ("critic/value_loss", "critic/values_mse"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    critic, base = (load_file(resumed / "checkpoint-000004" / "critic" / "model.safetensors"),
                    load_file(Path(tiny_model) / "model.safetensors"))
    assert max(float((critic[k] - base[k]).abs().max()) for k in base if k in critic) > 1e-6  # the critic trained


def test_two_ranks_killed_mid_step_resume_exactly(tiny_model, tmp_path):
    """torchrun, 2 ranks, PPO (the random tiny actor scores 0, so GRPO's advantages would all be 0; the critic's are
    not): a run SIGKILLed (every process at once) in step 3, after its sharded checkpoint-000002, resumes from it to
    the actor, critic and metrics of an uninterrupted run; the last checkpoint loads with from_pretrained."""
    import signal
    import time
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")  # a vLLM dependency
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(4)))
    straight, killed, extra = (tmp_path / "straight", tmp_path / "killed",
                               ["--algo", "ppo", "--lr", "1e-3", "--critic-lr", "1e-3"])
    run_train(straight, tiny_model, str(data), 4, "vllm", extra, ranks=2)
    proc = subprocess.Popen(train_command(killed, tiny_model, str(data), 4, "vllm", extra, ranks=2), cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    while (not (killed / "checkpoint-000002" / "trainer_state.pt").is_file() and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.1)
    time.sleep(1.0)  # into step 3
    launcher = psutil.Process(proc.pid)
    for p in [launcher, *launcher.children(recursive=True)]:  # torchrun starts its workers in sessions of their own
        p.send_signal(signal.SIGKILL)
    proc.wait()
    # killed before step 4's checkpoint
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert sorted(p.name for p in (killed / "checkpoint-000002" / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    # an intermediate checkpoint is shards only
    assert not (killed / "checkpoint-000002" / "model.safetensors").exists()
    resumed = run_train(killed, tiny_model, str(data), 4, "vllm", extra + ["--resume"], ranks=2)
    assert "[resume] from" in resumed.stderr and "step 2" in resumed.stderr
    start = load_file(Path(tiny_model) / "model.safetensors")
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = load_file(straight / "checkpoint-000004" / part), load_file(killed / "checkpoint-000004" / part)
        assert a.keys() == b.keys()
        assert max(float((a[k] - start[k]).abs().max()) for k in a if k in start) > 1e-4, part  # both models trained
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (part, k, float((a[k] - b[k]).abs().max()))
    a = load_file(straight / "checkpoint-000004" / "model.safetensors")
    rows_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    # every engine has the synced (and resumed) weights
    assert all(r["logprob_diff_engine_trainer"] < 1e-3 for r in rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for key in COMPARED + ("critic/value_loss",):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(killed / "checkpoint-000004", dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, a["model.embed_tokens.weight"])

"""Two ranks under torchrun with FSDP2 (gloo) make the same update as one process."""
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_fsdp_update.py")



def _free_port() -> int:
    """A port nobody listens on now (a fixed one fails when a killed earlier run still holds it)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

def test_fsdp2_two_ranks_match_one_process(tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, sharded = tmp_path / "single.pt", tmp_path / "fsdp.pt"
    subprocess.run([sys.executable, str(WORKER), tiny_model, str(single)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={_free_port()}", str(WORKER), tiny_model, str(sharded)],
                   check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(sharded)
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, float((a[k] - b[k]).abs().max()))


def test_torchrun_two_ranks_with_per_rank_vllm_engines(tiny_model, tmp_path):
    """The whole loop under torchrun: prompts sharded, FSDP2 actor, one vLLM engine per rank, weight sync."""
    import json

    import pytest
    pytest.importorskip("vllm")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(root / "train.py"), "--model", tiny_model,
                           "--steps", "2", "--prompts-per-step", "4", "--rollouts-per-prompt", "2",
                           "--max-new-tokens", "8", "--no-eval", "--dtype", "fp32", "--engine-dtype", "float32",
                           "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollouts"] == 8 for r in rows)  # 4 prompts x 2, summed over both ranks
    assert all(r["logprob_diff_engine_trainer"] < 1e-3 for r in rows)  # every rank's engine got the synced weights
    assert (out / "checkpoint-000002" / "model.safetensors").is_file()

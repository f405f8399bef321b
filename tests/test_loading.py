"""Sharded loading (rank 0 reads the weights; the others build on the meta device and receive their shards), and the
distributed checks at start: one shared --out, --prompts-per-step a multiple of the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, port: int):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(ROOT / "tests" / "_loading_worker.py"),
        *map(str, args),
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_two_ranks_load_the_checkpoint_from_rank_0(tiny_model, tmp_path):
    """Every weight and buffer (rotary inv_freq: no checkpoint holds it) equals from_pretrained's, as FSDP2 shards."""
    proc = torchrun("load", tiny_model, tmp_path / "out.json", port=29631)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["weights_equal"] and result["buffers_equal"] and result["sharded"], result


@pytest.mark.slow  # starts processes that import torch / train.py
def test_ranks_that_see_different_out_folders_stop(tmp_path):
    """One filesystem for --out: rank 0's marker must be visible to every rank."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    apart = torchrun("shared", tmp_path / "a", tmp_path / "b", port=29632)
    assert apart.returncode != 0 and "is not the same folder on every rank" in apart.stderr
    together = torchrun("shared", tmp_path / "a", tmp_path / "a", port=29633)
    assert together.returncode == 0, together.stderr[-2000:]
    assert together.stdout.count("shared --out ok") == 2 and not list(
        (tmp_path / "a").iterdir()
    )  # the marker is removed


def test_prompts_per_step_must_divide_over_the_ranks(monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train.parse_args(["--prompts-per-step", "6"])
    assert train.parse_args(["--prompts-per-step", "8"]).prompts_per_step == 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.parse_args(["--prompts-per-step", "3"]).prompts_per_step == 3

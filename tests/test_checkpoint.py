"""Streamed weight gathering, sharded checkpoints (DCP) across world sizes, the Hugging Face export, and the
HF engine's streamed load. The exact resume of whole runs (1 and 2 ranks, SIGKILL) is in test_resume.py."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _helpers import full_state_dict

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_checkpoint_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(ranks: int, *args) -> None:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={ranks}", f"--master_port={_free_port()}"]
    subprocess.run([*launcher, str(WORKER), *map(str, args)], check=True, env=ENV, timeout=600, cwd=ROOT)


def test_streamed_gather_equals_full_tensor_and_keeps_nothing(tiny_model, tmp_path):
    """2 ranks: every bucket size and dtype yields full_tensor()'s values (the tied lm_head under its own name, or
    not at all with tied=False), one all-gather per bucket, and the generator keeps no tensor it handed out."""
    worker(2, "stream", tiny_model, tmp_path / "stream.json")
    r = json.loads((tmp_path / "stream.json").read_text())
    assert r["aliases"] == ["lm_head.weight"] and r["kept"] == 0
    g = r["gathers"]
    # bucket 0: one all-gather per weight (embedding, 2 x 9 per layer, final norm, tied lm_head)
    assert g["0/None"] == 21
    assert g["1000.0/None"] == 1  # everything in one bucket
    # bf16 buckets hold twice the parameters
    assert g["0/None"] > g["0.05/None"] > g["0.05/torch.bfloat16"] > g["1.0/None"] > 1


def test_sharded_checkpoint_reshards_across_world_sizes(tiny_model, tmp_path):
    """A DCP checkpoint saved by 2 ranks loads into 2 ranks and into 1 process, one saved by 1 process into 2 ranks:
    the same weights and AdamW state (step, exp_avg, exp_avg_sq) bit for bit. No rank gathered anything to save."""
    worker(2, "save", tiny_model, tmp_path / "by2", tmp_path / "saved2.pt")
    assert sorted(p.name for p in (tmp_path / "by2").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    worker(2, "load", tiny_model, tmp_path / "by2", tmp_path / "loaded22.pt")
    worker(1, "load", tiny_model, tmp_path / "by2", tmp_path / "loaded21.pt")
    worker(1, "save", tiny_model, tmp_path / "by1", tmp_path / "saved1.pt")
    worker(2, "load", tiny_model, tmp_path / "by1", tmp_path / "loaded12.pt")
    for saved, loaded in (("saved2", "loaded22"), ("saved2", "loaded21"), ("saved1", "loaded12")):
        a, b = torch.load(tmp_path / f"{saved}.pt"), torch.load(tmp_path / f"{loaded}.pt")
        assert a["weights"].keys() == b["weights"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
        assert len(a["optimizer"]) == 20 and all(v["step"] == 1 for v in a["optimizer"].values())  # one step taken
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), (saved, loaded, k)
        for k in a["optimizer"]:
            for s in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a["optimizer"][k][s], b["optimizer"][k][s]), (saved, loaded, k, s)
    # and FSDP2 trained like one process
    one, two = torch.load(tmp_path / "saved1.pt"), torch.load(tmp_path / "saved2.pt")
    assert all(torch.allclose(one["weights"][k], two["weights"][k], atol=1e-5) for k in one["weights"])


def _checkpoint_folder(tiny_model, folder):
    """A train.py-style checkpoint of the tiny model after one optimizer step: sharded/ + config + tokenizer."""
    import checkpoint
    from actor import adamw, load_actor
    from transformers import AutoTokenizer
    model = load_actor(tiny_model, torch.device("cpu"), 1)
    optimizer = adamw(model.parameters(), lr=1e-2, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    folder.mkdir()
    checkpoint.save_sharded(folder / "sharded", model, optimizer)
    checkpoint.write_model_files(folder, model, AutoTokenizer.from_pretrained(tiny_model))
    return model


def test_export_writes_hugging_face_folders_that_load(tiny_model, tmp_path):
    """eval.py export: the shards -> safetensors (one file, or several + index past the shard size) next to config and
    tokenizer; from_pretrained gives the trained weights back, the tied lm_head included."""
    from transformers import AutoModelForCausalLM
    model = _checkpoint_folder(tiny_model, tmp_path / "checkpoint-000001")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "export", str(tmp_path / "checkpoint-000001"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "sharded").exists() and (tmp_path / "out" / "tokenizer.json").is_file()
    import checkpoint
    checkpoint.export_checkpoint(tmp_path / "checkpoint-000001", tmp_path / "split", shard_mb=10)  # ~52 MB of weights
    files = sorted(p.name for p in (tmp_path / "split").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (tmp_path / "split" / "model.safetensors.index.json").is_file()
    for folder in ("out", "split"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32)
        for name, p in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), (folder, name)
    bad = subprocess.run([sys.executable, str(ROOT / "eval.py"), "export", tiny_model], capture_output=True, text=True,
                         env=ENV, timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "is no train.py checkpoint (no sharded/.metadata)" in bad.stderr


def test_exported_folder_loads_in_vllm(tiny_model, tmp_path):
    pytest.importorskip("vllm")
    import checkpoint
    from engine import VLLMEngine
    _checkpoint_folder(tiny_model, tmp_path / "checkpoint-000001")
    checkpoint.export_checkpoint(tmp_path / "checkpoint-000001")  # in place, as the last checkpoint of a run
    engine = VLLMEngine(str(tmp_path / "checkpoint-000001"), dtype="float32", max_model_len=128)
    samples = engine.generate([[1, 2, 3]], 2, 4, 1.0, 1.0, seed=0)
    engine.close()
    assert len(samples[0]) == 2 and all(len(s.token_ids) >= 1 for s in samples[0])


def test_a_checkpoint_without_shards_is_refused_by_name(tmp_path):
    """A checkpoint folder of the older layout (full weights, no sharded/) stops --resume with an error naming it; a
    shards-only one given as --model says how to export it."""
    import checkpoint
    folder = tmp_path / "checkpoint-000003"
    folder.mkdir()
    torch.save({"step": 3}, folder / "trainer_state.pt")
    with pytest.raises(SystemExit, match="checkpoint-000003 has no sharded/.metadata"):
        checkpoint.read_trainer_state(folder, tmp_path)
    from rollout import resolve_model_path  # --model on an intermediate (shards only) checkpoint: told to export it
    (folder / "sharded").mkdir()
    (folder / "sharded" / ".metadata").write_bytes(b"")
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="python eval.py export"):
        resolve_model_path(str(folder))


def test_hf_engine_loads_streamed_weights(tiny_model):
    """HFEngine.load_weights copies each tensor as it arrives (a generator), the tied lm_head following the
    embedding."""
    import actor
    from engine import HFEngine
    from transformers import AutoModelForCausalLM
    engine = HFEngine(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    engine.load_weights(actor.stream_full_parameters(model, dtype=engine.dtype))
    for name, p in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], p), name
    with pytest.raises(KeyError, match="no weight 'nope'"):
        engine.load_weights(iter([("nope", torch.zeros(1))]))


def test_gradient_checkpointing_gives_the_same_update(tiny_model):
    """--gradient-checkpointing recomputes activations in the backward: the same weights after an update (1e-6)."""
    import actor
    from _fsdp_update import fixed_batch
    from update import UpdateSettings, ppo_update
    weights = []
    for checkpointing in (False, True):
        args = SimpleNamespace(ppo_epochs=1, mini_batches=1, micro_batch_size=4, loss_agg="token-mean", clip_low=0.2,
                               clip_high=0.28, kl_coef=0.0, grad_clip=1.0, dtype="fp32", seed=0, share_prompts=True,
                               temperature=1.0, clip_ratio_c=3.0, gradient_checkpointing=checkpointing)
        model = actor.load_actor(tiny_model, torch.device("cpu"), 1, args).train()
        assert model.is_gradient_checkpointing == checkpointing
        optimizer = actor.adamw(model.parameters(), lr=1e-3, weight_decay=0.01)
        ppo_update(model, optimizer, fixed_batch(), UpdateSettings.of(args), torch.device("cpu"), 1)
        weights.append(full_state_dict(model))
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k

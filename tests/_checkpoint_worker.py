"""Worker for test_checkpoint.py (one process or torchrun): streamed weight gathering and sharded checkpoints.

    python tests/_checkpoint_worker.py stream MODEL OUT.json  # torchrun: every bucket size == full_tensor()
    python tests/_checkpoint_worker.py save MODEL DIR OUT.pt  # train a step, save_sharded(DIR), dump full state
    python tests/_checkpoint_worker.py load MODEL DIR OUT.pt  # load_sharded(DIR) into a fresh model, dump full state
"""
import json
import os
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor  # noqa: E402
from _helpers import full_state_dict  # noqa: E402
import checkpoint  # noqa: E402
from collectives import setup_distributed  # noqa: E402
from _fsdp_update import fixed_batch  # noqa: E402
from update import UpdateSettings, ppo_update  # noqa: E402

SETTINGS = UpdateSettings.of(SimpleNamespace(ppo_epochs=1, mini_batches=1, micro_batch_size=2, loss_agg="token-mean",
                                             clip_low=0.2, clip_high=0.28, kl_coef=0.0, grad_clip=1.0, dtype="fp32",
                                             seed=0, share_prompts=True, temperature=1.0, clip_ratio_c=3.0))


def full_state(model, optimizer) -> dict:
    """Full weights and optimizer state (gathered: small test models only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"weights": {k: v.clone() for k, v in full_state_dict(model).items()},
            "optimizer": {k: {s: t.clone() for s, t in v.items()} for k, v in optim.get("state", {}).items()}}


def stream_check(model) -> dict:
    """Every bucket size and dtype gives full_tensor()'s values, the tied lm_head included unless tied=False; the
    generator keeps nothing it handed out."""
    from torch.distributed.tensor import DTensor
    reference = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                 for k, v in model.state_dict().items()}
    gathers, real = [0], torch.distributed.all_gather_single  # the name actor.py calls (torch 2.13)

    def counting(*a, **k):
        gathers[0] += 1
        return real(*a, **k)

    torch.distributed.all_gather_single = counting
    result = {"aliases": sorted(checkpoint.tied_aliases(model)), "gathers": {}, "kept": 0}
    for bucket_mb in (0, 0.05, 1.0, 1000.0):
        for dtype in (None, torch.bfloat16):
            gathers[0], previous = 0, None
            seen = []
            for name, tensor in actor.stream_full_parameters(model, bucket_mb, dtype):
                result["kept"] += previous is not None and previous() is not None  # the generator dropped the last one
                expected = reference[name] if dtype is None else reference[name].to(dtype)
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), (name, bucket_mb, dtype)
                seen.append(name)
                previous = weakref.ref(tensor)
                del tensor
            assert sorted(seen) == sorted(reference), seen
            result["gathers"][f"{bucket_mb}/{dtype}"] = gathers[0]
    untied = [name for name, _ in actor.stream_full_parameters(model, 1.0, tied=False)]
    assert sorted(untied) == sorted(set(reference) - checkpoint.tied_aliases(model)), untied
    torch.distributed.all_gather_single = real
    return result


def main():
    mode, model_dir = sys.argv[1], sys.argv[2]
    rank, world, device = setup_distributed()
    torch.manual_seed(0)
    model = actor.load_actor(model_dir, device, world)
    optimizer = actor.adamw(model.parameters(), lr=1e-3, weight_decay=0.01)
    if mode == "stream":
        result = stream_check(model)
        if rank == 0:
            Path(sys.argv[3]).write_text(json.dumps(result))
    elif mode == "save":
        batch = fixed_batch()
        rows = torch.arange(len(batch)).chunk(world)[rank]
        ppo_update(model, optimizer, batch.select(rows), SETTINGS, device, world)
        checkpoint.save_sharded(sys.argv[3], model, optimizer)
        state = full_state(model, optimizer)
        if rank == 0:
            torch.save(state, sys.argv[4])
    elif mode == "load":
        checkpoint.load_sharded(sys.argv[3], model, optimizer)
        state = full_state(model, optimizer)
        if rank == 0:
            torch.save(state, sys.argv[4])
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # see _fsdp_update.py: no interpreter teardown racing a gloo thread

"""Worker for test_fsdp.py: one shared PPO update of a tiny Llama on a fixed batch; saves the weights.

    python tests/_fsdp_update.py MODEL OUT                     # one process
    torchrun --nproc_per_node=2 tests/_fsdp_update.py MODEL OUT  # FSDP2, each rank half the batch
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor  # noqa: E402
from _helpers import full_state_dict  # noqa: E402
from collectives import setup_distributed  # noqa: E402
from engine import Sample  # noqa: E402
from rollout import build_rollout_batch  # noqa: E402
from update import UpdateSettings, ppo_update  # noqa: E402


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (5, 3, 6, 4)]
    samples = [[Sample(torch.randint(10, 500, (n,), generator=g).tolist(), [0.0] * n, "", "stop") for n in lens]
               for lens in ((4, 2, 6), (5, 1, 3), (2, 2, 7), (6, 3, 1))]
    batch = build_rollout_batch(prompts, samples, [float(i % 2) for i in range(12)], pad_id=2)
    batch.old_logprobs = -torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask
    batch.advantages = torch.randn(12, generator=g)[:, None] * batch.response_mask
    return batch


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    rank, world, device = setup_distributed()
    torch.manual_seed(0)
    model = actor.load_actor(model_dir, device, world)
    batch = fixed_batch()
    rows = torch.arange(len(batch)).chunk(world)[rank]  # rank r takes its contiguous share of prompts
    settings = UpdateSettings.of(SimpleNamespace(
        ppo_epochs=1, mini_batches=1, micro_batch_size=2, loss_agg="token-mean", clip_low=0.2, clip_high=0.28,
        kl_coef=0.0, grad_clip=1.0, dtype="fp32", seed=0, share_prompts=True, temperature=1.0, clip_ratio_c=3.0))
    opt = actor.adamw(model.parameters(), lr=1e-3, weight_decay=0.01)
    # Two optimizer steps. Step s uses half s of every rank's rows; one process sees the union.
    shares = torch.arange(len(batch)).chunk(2)  # rows of rank 0 and rank 1 in a 2-rank run
    for s in range(2):
        halves = [share.chunk(2)[s] for share in shares]
        rows = halves[rank] if world > 1 else torch.cat(halves)
        ppo_update(model, opt, batch.select(rows), settings, device, world)
    weights = full_state_dict(model)
    if rank == 0:
        torch.save({k: v.clone() for k, v in weights.items()}, out)
    if world > 1:
        torch.distributed.barrier()  # rank 0 finishes saving before anyone tears gloo down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: once in a few runs a gloo thread still joinable at static
    # destruction made rank 1 abort ("terminate called without an active exception") after its work was done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)

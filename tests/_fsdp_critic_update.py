"""Worker for test_genac.py: two critic REINFORCE steps (SGD, lr 1) of a tiny Llama on GenAC-shaped states; saves the
weights.

    python tests/_fsdp_critic_update.py MODEL OUT unpacked                      # one process, one row per state
    torchrun --nproc_per_node=2 tests/_fsdp_critic_update.py MODEL OUT packed   # FSDP2, each rank its responses, packed
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import actor  # noqa: E402
from _helpers import full_state_dict  # noqa: E402
from collectives import setup_distributed  # noqa: E402
from test_genac import critic_states_batch  # noqa: E402
from update import UpdateSettings, ppo_update  # noqa: E402


def main():
    model_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rank, world, device = setup_distributed()
    torch.manual_seed(0)
    model = actor.load_actor(model_dir, device, world)
    batch, _, _ = critic_states_batch(torch.Generator().manual_seed(7),
                                      responses=((0, 3, 8), (0, 5), (0, 2, 4, 6, 9), (0, 4)))
    batch.advantages = (torch.randn(len(batch), generator=torch.Generator().manual_seed(8))[:, None]
                        * batch.response_mask)
    args = SimpleNamespace(ppo_epochs=1, mini_batches=1, micro_batch_size=3, loss_agg="token-mean", clip_low=0.2,
                           clip_high=0.2, kl_coef=0.0, grad_clip=1.0, dtype="fp32", seed=0, share_prompts=False,
                           temperature=1.0, clip_ratio_c=3.0)
    settings = UpdateSettings.of(args, share_prefixes=mode == "packed")
    # weights move by the gradients themselves (Adam would amplify noise)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for step in range(2):  # step s: responses {s, s + 2}; rank r takes response s + 2 r
        owners = [step + 2 * r for r in range(2)] if world == 1 else [step + 2 * rank]
        rows = torch.nonzero(torch.isin(batch.group_index, torch.tensor(owners))).flatten()
        ppo_update(model, opt, batch.select(rows), settings, device, world)
    weights = full_state_dict(model)
    if rank == 0:
        torch.save({k: v.clone() for k, v in weights.items()}, out)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # as _fsdp_update.py: skip the interpreter teardown (a joinable gloo thread once aborted rank 1)

"""Worker for test_loading.py, under torchrun (gloo):

python tests/_loading_worker.py load MODEL OUT.json     # actor.load_actor: rank 0 reads, the others receive shards
python tests/_loading_worker.py shared DIR_RANK0 DIR_RANK1  # collectives.check_shared_out, each rank's own --out
"""

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor  # noqa: E402
from collectives import check_shared_out  # noqa: E402
from _helpers import full_state_dict  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, mode = dist.get_rank(), sys.argv[1]
    if mode == "load":
        from transformers import AutoModelForCausalLM

        model = actor.load_actor(sys.argv[2], torch.device("cpu"), dist.get_world_size())
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        full = full_state_dict(model)
        buffers = {name: (b.full_tensor() if hasattr(b, "full_tensor") else b) for name, b in model.named_buffers()}
        if rank == 0:
            ref = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
            result = {
                "weights_equal": sorted(ref.state_dict()) == sorted(full)
                and all(torch.equal(v, full[k]) for k, v in ref.state_dict().items()),
                "buffers_equal": all(torch.equal(b, buffers[n]) for n, b in ref.named_buffers()),
                "sharded": all(hasattr(p, "to_local") for p in model.parameters()),
                "peak_gb_rank0": peak_gb,
            }
            Path(sys.argv[3]).write_text(json.dumps(result))
    else:
        check_shared_out(Path(sys.argv[2 + rank]), rank, dist.get_world_size())
        print(f"rank {rank}: shared --out ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()

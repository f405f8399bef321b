"""collectives.all_reduce's NCCL branch on this CPU: NCCL reduces only CUDA tensors, so a CPU tensor (the metric sums,
V0.5's OSLA counts, GenAC's totals: everything an algorithm sums through step.all_reduce) goes to the GPU, is reduced
there, and comes back into the same tensor. The process group is replaced by a spy (two ranks holding equal values).
The copy to the GPU is a clone here: a CPU build of torch refuses a copy across devices even between fake tensors
(FakeTensorMode builds a CUDA tensor, it does not move one), so only a GPU node runs the move itself."""

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import collectives


def nccl_spy(monkeypatch, seen: list):
    """An initialized 'nccl' group of two ranks with equal values: all_reduce doubles in place, recording its input."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")

    def all_reduce(t, op=None):
        seen.append((t, op))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def test_nccl_reduces_a_cpu_tensor_on_the_gpu_and_brings_the_sum_back(monkeypatch):
    seen, moved = [], []
    nccl_spy(monkeypatch, seen)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: moved.append(self) or self.clone())
    x = torch.tensor([1.0, 2.0, 3.0])  # a CPU tensor, as the metric sums are
    out = collectives.all_reduce(x, dist.ReduceOp.MAX)
    assert moved == [x] and seen[0][0] is not x  # reduced on the GPU copy
    assert seen[0][1] == dist.ReduceOp.MAX  # with the op asked for (default: SUM, below)
    assert out is x and x.tolist() == [2.0, 4.0, 6.0]  # the sum back in the same tensor
    collectives.all_reduce(torch.ones(1))
    assert seen[1][1] == dist.ReduceOp.SUM


def test_gloo_and_cuda_tensors_are_reduced_where_they_are(monkeypatch):
    """gloo (the CPU runs) reduces the tensor itself; so does NCCL a CUDA one (no copy)."""
    seen = []
    nccl_spy(monkeypatch, seen)
    with FakeTensorMode():
        on_gpu = torch.ones(2, device="cuda")
        collectives.all_reduce(on_gpu)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    x = torch.ones(2)
    collectives.all_reduce(x)
    assert seen[0][0] is on_gpu and seen[1][0] is x and x.tolist() == [2.0, 2.0]


def test_one_process_is_a_no_op():
    x = torch.ones(2)
    assert collectives.all_reduce(x) is x and x.tolist() == [1.0, 1.0]
    assert collectives.all_gather_objects({"a": 1}) == [{"a": 1}]

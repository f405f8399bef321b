"""Test-only helpers: reference implementations the tests compare the code against."""
import torch

from actor import stream_full_parameters


def full_state_dict(model) -> dict:
    """Full (unsharded) weights on every rank, all at once (all ranks must call this); a tied lm_head as its own
    entry, as model.state_dict(). The loop itself streams them (actor.stream_full_parameters)."""
    return dict(stream_full_parameters(model, bucket_mb=0))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten over the real tokens of the batch (verl's `masked_whiten`, unbiased variance). [N, R] -> [N, R]."""
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask

"""A loss-changing algorithm for tests/test_loss_interface.py, written as a user would from the README: GRPO's
advantages with GSPO's sequence-level importance ratio (arXiv:2507.18071, its s_i(theta)),
s_i = exp(mean_t (log pi_theta - log pi_old)), clipped per response, one loss for all of its tokens."""
import torch

from advantage import GRPO


class SequenceRatioGRPO(GRPO):
    """GRPO with the importance ratio per response (GSPO) instead of per token; --loss-agg seq-mean-token-mean."""

    @staticmethod
    def add_arguments(parser) -> None:
        GRPO.add_arguments(parser)
        parser.set_defaults(loss_agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4)  # GSPO's clip range

    calls: list = []  # the test reads what the loop handed over

    def token_losses(self, logp, old_logp, advantages, mask, settings):
        """[b, R] each -> (losses [b, R], clipped [b, R] bool): -min(s_i A_i, clip(s_i) A_i) on every token of i."""
        log_ratio = ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)  # [b] mean over the response
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))[:, None]  # [b, 1]
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - settings.clip_low, 1 + settings.clip_high) * advantages
        SequenceRatioGRPO.calls.append((mask.shape, float(mask.sum()), float(ratio.detach().max())))
        return -torch.minimum(unclipped, clipped), (clipped < unclipped) & mask.bool()

"""How an MSA layer's KL loss reaches the index projections and the logs.

The KL is not added to the LM loss tensor: like megatron-core's MoE aux loss and DSA indexer
loss, it rides on the attention output through an identity autograd function whose backward
injects d(KL) scaled by the schedule's loss scale (set per micro-batch by megatron-core through
`config.experimental_attention_variant_loss_scale_func`, which divides by the number of
micro-batches). Values for logging accumulate on the layer until the training loop collects them.
"""

from __future__ import annotations

from typing import Optional

import torch


class KLLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward also sends `loss_scale` into `kl_loss`'s graph."""

    loss_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, kl_loss: torch.Tensor):
        ctx.save_for_backward(kl_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (kl_loss,) = ctx.saved_tensors
        scale = KLLossAutoScaler.loss_scale
        scale = torch.ones((), device=kl_loss.device) if scale is None else scale.to(kl_loss.device)
        return grad_output, torch.ones_like(kl_loss) * scale.reshape(()).to(kl_loss.dtype)

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        KLLossAutoScaler.loss_scale = scale.detach().reshape(())


class LayerKLStats:
    """Running sums of one layer's KL values (detached) between two log steps."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.kl_values: list[torch.Tensor] = []
        self.recall_sum = [0.0, 0.0]
        self.recall_count = 0

    def record_kl(self, kl: torch.Tensor) -> None:
        """Kept, not added: a value computed in the backward (ops.sparse_attention_with_kl) is
        written after this call, so the sum is taken when the training loop reads it."""
        self.kl_values.append(kl.detach())

    @property
    def count(self) -> int:
        return len(self.kl_values)

    @property
    def kl_sum(self) -> Optional[torch.Tensor]:
        return torch.stack(self.kl_values).float().sum() if self.kl_values else None

    def record_recall(self, block_recall: Optional[float], score_recall: Optional[float]) -> None:
        if block_recall is None:
            return
        self.recall_sum[0] += block_recall
        self.recall_sum[1] += score_recall
        self.recall_count += 1

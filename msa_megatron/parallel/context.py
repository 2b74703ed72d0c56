"""Context parallelism for MSA: which tokens a rank keeps, and the gather of keys over the CP group.

Split (megatron's load-balanced scheme): every sample of `sample_len` tokens in a packed
micro-batch is cut into 2*CP equal chunks and CP rank r keeps chunks r and 2*CP-1-r, so every rank
holds the same number of tokens and about the same causal work whatever the documents are.
Documents cross chunk edges freely: each kept token keeps its row in the whole micro-batch
(`qpos`), so its document, its position (RoPE) and its visible keys are exactly those of CP 1.

Attention: queries stay on their rank; keys, values and index keys (4 KV heads and one index
head: cheap) are all-gathered over the CP group and put back in micro-batch order, and the backward
reduce-scatters their gradients. Each rank then selects top-k for its own queries over the whole
document, so the selection equals CP 1 exactly.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def rank_rows(num_tokens: int, sample_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Rows of the micro-batch kept by `cp_rank`: chunks r and 2*CP-1-r of every sample, in order."""
    if num_tokens % sample_len or sample_len % (2 * cp_size):
        raise ValueError(f"{num_tokens} tokens in samples of {sample_len} cannot be split into 2*{cp_size} chunks per sample")
    chunk = sample_len // (2 * cp_size)
    within = torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk) for c in sorted({cp_rank, 2 * cp_size - 1 - cp_rank})]
    )
    starts = torch.arange(0, num_tokens, sample_len)
    return (starts[:, None] + within[None, :]).reshape(-1).to(device)


def gather_order(num_tokens: int, sample_len: int, cp_size: int, device=None) -> torch.Tensor:
    """index[t] = where micro-batch row t sits in the CP all-gather (rank 0's rows, then rank 1's...)."""
    gathered = torch.cat([rank_rows(num_tokens, sample_len, cp_size, r) for r in range(cp_size)])
    return torch.argsort(gathered).to(device)


def gather_keys(local: torch.Tensor, index: torch.Tensor, group) -> torch.Tensor:
    """[T_local, ...] on each CP rank -> [T, ...] in micro-batch order. Backward: every rank's
    gradient for a row is summed into the rank that owns it (reduce-scatter)."""
    everyone = gather_from_sequence_parallel_region(local.contiguous(), tensor_parallel_output_grad=True, group=group)
    return everyone.index_select(0, index)


def lm_loss_scale(loss_mask: torch.Tensor, group):
    """(global masked-token count over the CP group, CP size).

    megatron's schedule divides a rank's loss sum by the count it is given and DDP averages the
    gradients over DP x CP; returning loss_sum * CP with the global count makes that exactly the
    CP-1 loss, even when the ranks' loss masks hold different numbers of tokens.
    """
    count = loss_mask.sum().to(torch.float64)
    torch.distributed.all_reduce(count, group=group)
    return count, group.size()

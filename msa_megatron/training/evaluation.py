"""What validation measures beyond the mean LM loss: loss by position, retrieval by distance.

The validation pass runs the model without labels, so the last pipeline stage returns logits
(the vocabulary split over tensor-parallel ranks). `validation_loss_func` turns them into each
token's loss (megatron-core's vocab-parallel cross entropy, as in training) and whether its label
is the arg-max, and sums both into log2 buckets:

- every token, by its position inside its document: `val/lm_loss_by_pos/<lo>-<hi>`;
- the answer rows a retrieval data source marks (`PackedBatch.answer_distance`, data=passkey), by
  how far back the answer was stored: `val/answer_acc/<lo>-<hi>` (arg-max credit; ties share it),
  `val/answer_loss/<lo>-<hi>`, `val/answer_count/<lo>-<hi>`, and overall `val/answer_acc`,
  `val/answer_loss`.

Buckets are [lo, hi) with edges 0, 64, 128, ... doubling up to data.seq_length. Every rank builds the
same-size vector of sums (zeros off the last pipeline stage and on TP ranks > 0), reduced once
with the rest of validation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

FIRST_EDGE = 64


def bucket_edges(seq_length: int) -> list[int]:
    """0, 64, 128, ... doubling, and seq_length last: positions and distances are < seq_length."""
    edges, edge = [0], FIRST_EDGE
    while edge < seq_length:
        edges.append(edge)
        edge *= 2
    return edges + [seq_length]


def bucket_names(edges: list[int]) -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]


def _bucket(values: torch.Tensor, edges: list[int]) -> torch.Tensor:
    inner = torch.tensor(edges[1:-1], dtype=values.dtype, device=values.device)
    return torch.bucketize(values, inner, right=True)


def argmax_credit(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """[..., V/TP] logits of this rank's vocabulary slice -> float [...]: 1 when the label has the
    largest logit of the whole vocabulary, 1/m when it shares the maximum with m-1 others (the
    chance that arg-max picks it), else 0. bf16 logits of a model that spreads its probability over
    the digits tie often; counting every tie as a hit inflated accuracy far above chance."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    width = logits.shape[-1]
    start = (dist.get_rank(tp_group) if tp > 1 else 0) * width
    top = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    ties = (logits == top.unsqueeze(-1)).sum(dim=-1).double()
    inside = (labels >= start) & (labels < start + width)
    target = logits.gather(-1, (labels - start).clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    at_top = (inside & (target == top)).double()
    if tp > 1:
        dist.all_reduce(ties, group=tp_group)
        dist.all_reduce(at_top, group=tp_group)
    return at_top / ties


def validation_loss_func(batch, edges: list[int], logits: torch.Tensor):
    """Loss function of a validation micro-batch (megatron's 3-tuple): its LM loss sum and token
    count, and the report {"lm_loss": [sum, count], "buckets": sums (see module doc)}."""
    tp_group = ps.get_tensor_model_parallel_group()
    labels = batch.labels  # [1, T]
    hits = argmax_credit(logits, labels, tp_group)  # first: the cross entropy shifts logits in place
    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous(), tp_group=tp_group
    ).transpose(0, 1)
    mask = batch.loss_mask.float()
    losses, n = losses.double().view(-1), len(edges) - 1
    weight = mask.double().view(-1)
    pos = _bucket(batch.position_ids.view(-1), edges)
    sums = torch.zeros(5 * n, dtype=torch.float64, device=losses.device)
    sums[0:n].index_add_(0, pos, losses * weight)
    sums[n:2 * n].index_add_(0, pos, weight)
    if batch.answer_distance is not None:
        distance = batch.answer_distance.view(-1)
        answer = (distance >= 0) & (weight > 0)
        where = _bucket(distance[answer], edges)
        sums[2 * n:3 * n].index_add_(0, where, hits.view(-1)[answer])
        sums[3 * n:4 * n].index_add_(0, where, losses[answer])
        sums[4 * n:5 * n].index_add_(0, where, torch.ones_like(losses[answer]))
    loss_sum, count = (losses * weight).sum(), weight.sum()
    report = {"lm_loss": torch.stack([loss_sum.detach().float(), count.float()]), "buckets": sums}
    return loss_sum.float(), count.to(torch.int), report


def reduce_buckets(reports: list, edges: list[int], contributes: bool, device) -> dict:
    """The bucket metrics of a validation pass (collective: every rank calls it)."""
    n = len(edges) - 1
    total = torch.zeros(5 * n, dtype=torch.float64, device=device)
    if contributes:
        for report in reports:
            total += report["buckets"].to(device)
    dist.all_reduce(total)
    pos_loss, pos_count, hits, answer_loss, answers = (total[i * n:(i + 1) * n].tolist() for i in range(5))
    record = {}
    for name, s, c in zip(bucket_names(edges), pos_loss, pos_count):
        if c > 0:
            record[f"val/lm_loss_by_pos/{name}"] = s / c
    if sum(answers) > 0:
        record["val/answer_acc"] = sum(hits) / sum(answers)
        record["val/answer_loss"] = sum(answer_loss) / sum(answers)
        for name, h, s, c in zip(bucket_names(edges), hits, answer_loss, answers):
            if c > 0:
                record[f"val/answer_acc/{name}"] = h / c
                record[f"val/answer_loss/{name}"] = s / c
                record[f"val/answer_count/{name}"] = int(c)
    return record

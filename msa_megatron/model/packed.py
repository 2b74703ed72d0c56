"""What a packed micro-batch tells the attention layers, beyond megatron's PackedSeqParams.

cu_seqlens_q / cu_seqlens_kv delimit the documents of the whole micro-batch (the key rows) and
max_seqlen_* is its longest document. Added:
- positions [T_local]: each local token's position inside its document (RoPE uses exactly this,
  so a context-parallel rank rotates its tokens as CP 1 does);
- qpos [T_local]: each local token's row in the micro-batch (None: all rows are local);
- cp_gather_index [T]: the order of the context-parallel all-gather (see parallel/context.py);
- cu_seqlens_host: cu_seqlens as host ints when the data pipeline has them (no device sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class PackedParams(PackedSeqParams):
    positions: Optional[torch.Tensor] = None
    qpos: Optional[torch.Tensor] = None
    cp_gather_index: Optional[torch.Tensor] = None
    cu_seqlens_host: Optional[tuple] = None


def document_positions(cu_seqlens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Position of each row inside its document (rows of the micro-batch, cu_seqlens over them)."""
    cu = cu_seqlens.to(device=rows.device, dtype=torch.long)
    doc = torch.searchsorted(cu, rows, right=True) - 1
    return rows - cu[doc]


def token_positions(packed_seq_params, num_tokens: int, device) -> torch.Tensor:
    """RoPE positions of the local tokens: from PackedParams, or restarting at every document."""
    positions = getattr(packed_seq_params, "positions", None)
    if positions is not None:
        return positions
    rows = torch.arange(num_tokens, device=device)
    return document_positions(packed_seq_params.cu_seqlens_q, rows)

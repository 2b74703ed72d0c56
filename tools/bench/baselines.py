"""What the MSA kernels are compared with: cuDNN / flash SDPA, materialized top-k, flex_attention."""

from __future__ import annotations

from tools.bench.common import BK, HKV, HQ, TOPK


def naive_select(qi, ki, n, chunk=4096):
    """Materialized [G, T, NB] block scores (chunked bf16 matmul + block max) then torch.topk."""
    import torch

    nb = (n + BK - 1) // BK
    scores = torch.full((HKV, n, nb), float("-inf"), device=qi.device, dtype=torch.float32)
    ki2 = ki[:, 0]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        kend = (b + BK - 1) // BK * BK
        s = torch.einsum("cgd,kd->gck", qi[a:b], ki2[: min(kend, n)])
        if s.shape[-1] < kend:
            s = torch.nn.functional.pad(s, (0, kend - s.shape[-1]), value=float("-inf"))
        qpos = torch.arange(a, b, device=qi.device)
        kpos = torch.arange(kend, device=qi.device)
        s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
        scores[:, a:b, : kend // BK] = s.view(HKV, b - a, kend // BK, BK).amax(-1).float()
    local = torch.arange(n, device=qi.device) // BK
    cand = scores.masked_fill(torch.arange(nb, device=qi.device)[None, None, :] >= local[None, :, None], float("-inf"))
    return torch.topk(cand, TOPK - 1, dim=-1, sorted=False).indices


class Sdpa:
    """Dense causal GQA through torch SDPA with one backend, one call per document, [1, H, S, d]."""

    def __init__(self, x, backend):
        self.backend = backend
        cu = x["cu"].tolist()
        self.docs = list(zip(cu[:-1], cu[1:]))
        heads_first = lambda t: t.transpose(0, 1).unsqueeze(0).contiguous()
        self.q, self.k, self.v, self.do = (heads_first(x[n]) for n in ("q", "k", "v", "do"))

    def __call__(self, bwd, scale):
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            for a, b in self.docs:
                q = self.q[:, :, a:b].detach().requires_grad_(bwd)
                k = self.k[:, :, a:b].detach().requires_grad_(bwd)
                v = self.v[:, :, a:b].detach().requires_grad_(bwd)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
                if bwd:
                    o.backward(self.do[:, :, a:b])


def flex_case(x, sel, n):
    """flex_attention with the selection as mask: BlockMask = union of each 128-query tile's picks."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nb = (n + BK - 1) // BK
    r = HQ // HKV
    chosen = torch.zeros(HKV, n, nb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(sel < 0, nb, sel).long(), True)
    chosen = chosen[..., :nb].contiguous()
    union = chosen.view(HKV, nb, BK, nb).any(2)  # [G, q-block, kv-block]
    union = union.repeat_interleave(r, 0).unsqueeze(0)  # [1, Hq, QB, KB]
    num = union.sum(-1).to(torch.int32)
    idx = torch.argsort(union.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return chosen[h // r, q_idx, kv_idx // BK] & (kv_idx <= q_idx)

    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BK, mask_mod=mask_mod, seq_lengths=(n, n))
    fa = torch.compile(flex_attention, dynamic=False)
    q = x["q"].transpose(0, 1).unsqueeze(0).contiguous()
    k = x["k"].transpose(0, 1).unsqueeze(0).contiguous()
    v = x["v"].transpose(0, 1).unsqueeze(0).contiguous()
    return fa, q, k, v, bm, float(union.sum().item()) / (HKV * nb)

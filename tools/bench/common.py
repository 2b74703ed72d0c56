"""Shapes, inputs, FLOP counts and the timer shared by the benchmark modules."""

from __future__ import annotations

import platform
import random
import statistics
import subprocess
import sys
import time

HQ, HKV, D, DI, BK, TOPK = 64, 4, 128, 128, 128, 16


def bench(fn, min_reps=3, max_reps=30, budget_s=1.5, sync_each=False):
    """Median ms of CUDA-event-timed calls after one warm-up call.

    The calls are queued back to back and synchronised once at the end (as triton.testing.do_bench
    does), so a call's time is its GPU time when the host runs ahead, as in training;
    `sync_each=True` waits for each call before launching the next, which adds the host's launch
    latency at the start of every call. The number of calls comes from the warm-up call's time.
    """
    import torch

    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget_s / max(one, 1e-6))))
    events = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        if sync_each:
            e.synchronize()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def slow_reps(n):
    """Repetition limits for calls that take seconds at long contexts."""
    return dict(min_reps=1 if n >= 65536 else 3, max_reps=3 if n >= 65536 else 10)


def mixed_lengths(n, seed=0):
    """A few long documents (1/2, 1/8, 1/8 of the tokens) and many short ones (64..2048 tokens)."""
    rng = random.Random(seed)
    longs = [n // 2, n // 8, n // 8]
    rest = n - sum(longs)
    shorts = []
    while rest > 0:
        length = min(rest, rng.randint(64, 2048))
        shorts.append(length)
        rest -= length
    docs = longs + shorts
    rng.shuffle(docs)
    return docs


def pair_counts(lengths):
    """(causal pairs, MSA attended pairs) of a packed batch."""
    causal = sum(n * (n + 1) // 2 for n in lengths)
    nnz = 0
    for n in lengths:
        for p in range(0, n, BK):  # per query block: positions p..p+Bk-1
            blk = p // BK
            hist = min(blk, TOPK - 1) * BK
            m = min(BK, n - p)
            nnz += m * hist + m * (m + 1) // 2
    return causal, nnz


def flops(lengths):
    """Useful FLOPs per op (MSA.md conventions)."""
    causal, nnz = pair_counts(lengths)
    return dict(
        index=2 * DI * HKV * causal,
        fwd=4 * D * HQ * nnz,
        bwd=10 * D * HQ * nnz,
        kl=2 * (D * HQ + 3 * DI * HKV) * nnz,
        dense_kl=2 * (D * HQ + 3 * DI * HKV) * causal,
        dense_fwd=4 * D * HQ * causal,
        dense_bwd=10 * D * HQ * causal,
    )


def env_info():
    import torch
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "timing": "queued",  # bench(): calls queued back to back, one sync at the end (from round 9)
    }
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        info["driver"] = f"unknown ({exc})"
    return info


def make_inputs(lengths, seed=0):
    import torch

    dev = torch.device("cuda")
    total = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    return dict(q=rnd(total, HQ, D), k=rnd(total, HKV, D), v=rnd(total, HKV, D), qi=rnd(total, HKV, DI),
                ki=rnd(total, 1, DI), do=rnd(total, HQ, D), cu=cu, lengths=lengths)


def shape_of(lengths):
    import itertools
    import math

    from msa_megatron.ops import MSAShape

    # the host's document edges, as the training data pipeline passes them (dense_lib: cudnn_docs)
    edges = tuple(itertools.accumulate(lengths, initial=0))
    return MSAShape(BK, TOPK, 1 / math.sqrt(D), 1 / math.sqrt(DI), max(lengths), doc_edges=edges)


def peak_gib(fn):
    """(peak bytes above what was allocated before, in GiB) of one call of fn."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def graph_replay_ms(fn):
    """bench() of fn captured once in a CUDA graph: its GPU time without the host's launch cost.

    Capture fails on a host sync, so a number here also shows fn needs none.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: JIT, allocator
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def host_syncs(fn):
    """Number of host synchronisations torch reports during a call of fn (sync debug mode "warn"),
    after one call that compiles its kernels (a first call's syncs are not the step's; the GPU test
    of the layer counts the same way)."""
    import warnings

    import torch

    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)

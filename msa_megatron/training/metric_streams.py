"""One owner per metric stream: validation accumulates into its own KL and MoE trackers.

The MSA layers sum their KL (and recall) into `layer.stats` and megatron-core's MoE layers into
the global MoE metrics tracker until the training loop reads them at a log step. A validation
pass between two log steps must neither add to those sums nor reset them, so it runs with fresh
trackers swapped in and the training ones put back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

from msa_megatron.model.kl_loss import LayerKLStats


@contextmanager
def separate_stream(msa_layers):
    """Inside: fresh per-layer KL stats and a fresh MoE tracker; outside: the training ones, untouched."""
    from megatron.core.transformer.moe import moe_logging

    saved_stats = [layer.stats for layer in msa_layers]
    saved_moe = moe_logging.get_moe_metrics_tracker()
    for layer in msa_layers:
        layer.stats = LayerKLStats()
    moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
    try:
        yield
    finally:
        for layer, stats in zip(msa_layers, saved_stats):
            layer.stats = stats
        moe_logging.set_moe_metrics_tracker(saved_moe)

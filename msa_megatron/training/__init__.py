"""Training: distributed setup, stages, loop on megatron-core schedules, metrics."""


def run(cfg):
    from msa_megatron.training.loop import run as _run

    return _run(cfg)

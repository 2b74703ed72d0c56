"""Train an MSA (or dense GQA) MoE model: `python train.py [group=option ...] [key=value ...]`.

Runs as one process, or one process per rank under torchrun / srun (slurm/launch.sh). A user
error (config, data, checkpoint, environment) prints one line and exits with code 2.
"""

import os
import sys

import hydra

from msa_megatron.config import register_hydra_schema

register_hydra_schema()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg) -> None:
    from msa_megatron.training.entry import main as train_main

    code = train_main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    overrides = sys.argv[1:]
    if not any(arg.startswith("-") for arg in overrides):  # plain overrides (not --help, -m, --cfg ...)
        from msa_megatron.training.entry import check_overrides

        code = check_overrides(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"), "config", overrides)
        if code:
            sys.exit(code)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # one rank prints Hydra's lines
    main()

"""Train an MSA (or dense GQA) MoE model: `python train.py [group=option ...] [key=value ...]`.

Runs as one process, or one process per rank under torchrun / srun.
"""

import os
import sys

import hydra

from msa_megatron.config import ConfigError, load_config, register_hydra_schema

register_hydra_schema()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg) -> None:
    try:
        run_cfg = load_config(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from msa_megatron.training import run
    from msa_megatron.training.checkpoint import CheckpointError

    try:
        run(run_cfg)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) != 0:
        # Only rank 0 writes Hydra's outputs (.hydra/ and the job log) into the run directory.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    main()

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
    if run_cfg.dry_run:  # the plan only: no GPU, no process group
        from hydra.core.hydra_config import HydraConfig

        from msa_megatron.dry_run import main as dry_run

        sys.exit(dry_run(run_cfg, list(HydraConfig.get().overrides.task)))
    from msa_megatron.training import run
    from msa_megatron.training.checkpoint import CheckpointError

    try:
        run(run_cfg)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)


def _is_dry_run(argv) -> bool:
    return any(a.split("=", 1)[0] == "dry_run" and a.split("=", 1)[-1].lower() in ("true", "yes", "on", "1") for a in argv)


if __name__ == "__main__":
    if _is_dry_run(sys.argv[1:]):  # a dry run writes nothing: no run directory, no Hydra record or log
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    if int(os.environ.get("RANK", "0")) != 0:
        # Only rank 0 writes Hydra's outputs (.hydra/ and the job log) into the run directory.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    main()

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
    from hydra.core.hydra_config import HydraConfig

    from msa_megatron.training.entry import main as train_main

    code = train_main(cfg, overrides=list(HydraConfig.get().overrides.task))
    if code:
        sys.exit(code)


def _is_dry_run(argv) -> bool:
    return any(a.split("=", 1)[0] == "dry_run" and a.split("=", 1)[-1].lower() in ("true", "yes", "on", "1") for a in argv)


if __name__ == "__main__":
    overrides = sys.argv[1:]
    if not any(arg.startswith("-") for arg in overrides):  # plain overrides (not --help, -m, --cfg ...)
        from msa_megatron.training.entry import check_overrides

        code = check_overrides(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"), "config", overrides)
        if code:
            sys.exit(code)
    if _is_dry_run(overrides):  # a dry run writes nothing: not even the run directory
        sys.argv += ["hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    elif int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # one rank prints Hydra's lines
    main()

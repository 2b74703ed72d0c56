#!/usr/bin/env bash
# The one launcher behind slurm/*.sbatch. The sbatch scripts `exec` it, so it is the batch shell:
#
#   launch.sh train [hydra overrides...]      srun one task per GPU running train.py; on the lead
#                                             signal (--signal=B:USR1@N) it tells every task to
#                                             save and stop, then requeues the job, which resumes
#   launch.sh preprocess [data_prep args...]  one shard of data_prep per array task
#   launch.sh task COMMAND...                 (what srun runs) rank variables from Slurm's, then exec
#
# Environment knobs (all optional):
#   MSA_HOME          the msa-megatron checkout (default: the directory sbatch was called from)
#   MSA_VENV          its virtual environment (default: $MSA_HOME/.venv)
#   MSA_PYTHON        the interpreter to run (default: $MSA_VENV/bin/python; `python` in a container)
#   MSA_CONTAINER_IMAGE, MSA_CONTAINER_MOUNTS   run the tasks in a container (pyxis srun flags)
#   MSA_OUTPUT_ROOT   where runs write (default: $MSA_HOME/outputs); run dir = $MSA_OUTPUT_ROOT/<name>
#   MSA_MASTER_PORT   rendezvous port (default: 20000 + job id mod 20000)
#   WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE (online | offline | disabled)   with logging=wandb
set -uo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }   # user errors: one line, exit code 2

mode=${1:-}
shift || true

if [[ $mode == task ]]; then
    # One srun task: torch.distributed's variables from Slurm's (no torchrun inside srun).
    export RANK=${SLURM_PROCID:?} WORLD_SIZE=${SLURM_NTASKS:?} LOCAL_RANK=${SLURM_LOCALID:?}
    export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
    exec "$@"
fi

[[ $mode == train || $mode == preprocess ]] || die "usage: launch.sh train|preprocess ARGS... (from an sbatch script)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: submit the sbatch script with sbatch (or run train.py / data_prep directly)"

MSA_HOME=${MSA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $MSA_HOME/train.py && -d $MSA_HOME/msa_megatron ]] ||
    die "MSA_HOME=$MSA_HOME: not an msa-megatron checkout (submit from the checkout or set MSA_HOME)"
if [[ -n ${MSA_CONTAINER_IMAGE:-} ]]; then
    MSA_PYTHON=${MSA_PYTHON:-python}
else
    MSA_VENV=${MSA_VENV:-$MSA_HOME/.venv}
    MSA_PYTHON=${MSA_PYTHON:-$MSA_VENV/bin/python}
    [[ -x $MSA_PYTHON ]] || die "MSA_PYTHON=$MSA_PYTHON: not an executable interpreter (run 'make venv' in MSA_HOME, or set MSA_VENV / MSA_PYTHON)"
fi
export MSA_OUTPUT_ROOT=${MSA_OUTPUT_ROOT:-$MSA_HOME/outputs}
mkdir -p "$MSA_OUTPUT_ROOT" 2> /dev/null && [[ -w $MSA_OUTPUT_ROOT ]] || die "MSA_OUTPUT_ROOT=$MSA_OUTPUT_ROOT: cannot write there"
case ${WANDB_MODE:-offline} in
    online | offline | disabled) ;;
    *) die "WANDB_MODE=$WANDB_MODE: must be online, offline or disabled" ;;
esac
export PYTHONPATH=$MSA_HOME${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
cd "$MSA_HOME" || die "MSA_HOME=$MSA_HOME: cannot enter it"

echo "launch.sh: job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}, restart ${SLURM_RESTART_COUNT:-0}," \
     "nodes ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} tasks, $(git -C "$MSA_HOME" rev-parse --short HEAD 2> /dev/null || echo 'no git'), $(date -u +%FT%TZ)"

if [[ $mode == preprocess ]]; then
    shard="${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}"
    [[ -z ${SLURM_ARRAY_TASK_ID:-} || -n ${SLURM_ARRAY_TASK_COUNT:-} ]] || die "SLURM_ARRAY_TASK_COUNT is not set in this array task"
    exec "$MSA_PYTHON" -m data_prep "$@" --shard "$shard" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress
fi

# ----------------------------------------------------------------------------------- train
port=${MSA_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "MSA_MASTER_PORT=$port: not a port number"
export MASTER_PORT=$port
export MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
[[ -n $MASTER_ADDR ]] || die "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST: scontrol names no host"

srun_args=(--kill-on-bad-exit=1)
if [[ -n ${MSA_CONTAINER_IMAGE:-} ]]; then
    srun_args+=(--container-image="$MSA_CONTAINER_IMAGE" --container-workdir="$MSA_HOME")
    [[ -n ${MSA_CONTAINER_MOUNTS:-} ]] && srun_args+=(--container-mounts="$MSA_CONTAINER_MOUNTS")
fi

# Bash runs a trap only between commands, so srun runs in the background and we `wait` on it.
stop_signal="" srun_pid="" interrupted=0
forward() {
    stop_signal=$1 interrupted=1
    echo "launch.sh: got SIG$1: every task saves a checkpoint at its next step and stops"
    [[ -n $srun_pid ]] && kill -s "$1" "$srun_pid" 2> /dev/null   # srun forwards it to every task
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun "${srun_args[@]}" "$MSA_HOME/slurm/launch.sh" task "$MSA_PYTHON" "$MSA_HOME/train.py" "$@" &
srun_pid=$!
while true; do
    interrupted=0
    wait "$srun_pid"
    rc=$?
    ((interrupted)) || break   # a trap cut `wait` short: wait again for srun's own exit code
done

if [[ $rc == 0 && $stop_signal == USR1 ]]; then
    # The time-limit warning: the run saved; the same job comes back and resumes from it.
    echo "launch.sh: requeueing job $SLURM_JOB_ID to resume from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed: resubmit the same command to resume"
fi
exit "$rc"

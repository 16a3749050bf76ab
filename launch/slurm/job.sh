#!/usr/bin/env bash
# What every launch/slurm/*.sbatch runs: one `accelerate launch` per node of the allocation, the run resumed
# where it stopped, and the job requeued when the run stopped early (a signal, its time limit).
#
# Set by the .sbatch file: TRAIN_CONFIG (training YAML), ACCELERATE_CONFIG (the topology: ddp/fsdp/cpu_ddp
# yaml), PROCS_PER_NODE (GPUs per node, or CPU processes). Arguments: training overrides (section.key=value).
#
# Why it is written this way:
# - The machine rank is each launcher's own SLURM_NODEID, expanded inside the srun task (single quotes below),
#   never by this batch shell: expanded here it would be 0 on every node, and the job would hang.
# - The head node's address comes from the allocation (scontrol + getent). If either cannot answer, the job
#   fails with a message; it never falls back to localhost, where every node would train alone, silently.
# - The port is derived from the job id: the same on every node, different for two jobs sharing a node.
# - The launcher ignores SIGUSR1 (SLURM's warning signal, `#SBATCH --signal=USR1@...`, sent to every process of
#   the job step); its workers catch it, agree on a step, save a checkpoint and exit with status.json KILLED,
#   which this script turns into `scontrol requeue`. The requeued job runs this same script again:
#   train.resume=auto then continues from the latest checkpoint (and the same MLflow run).
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }

: "${TRAIN_CONFIG:?the .sbatch file sets TRAIN_CONFIG}" "${ACCELERATE_CONFIG:?}" "${PROCS_PER_NODE:?}"
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a SLURM job: submit it with sbatch (see README, On a SLURM cluster)"
ROOT=${DIST_LM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $ROOT/launch/train.py ]] || fail "no dist_lm checkout at $ROOT: submit from the repository's root, or set DIST_LM_ROOT"
cd "$ROOT"
PYTHON=${PYTHON:-python3}
command -v scontrol >/dev/null || fail "scontrol is not on PATH on $(hostname): the job needs SLURM's client commands \
(inside a container, bind them in); without them it cannot find its nodes or requeue itself"

NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST") \
    || fail "scontrol cannot expand the job's node list '$SLURM_JOB_NODELIST'"
mapfile -t NODE_NAMES <<< "$NODES"
(( ${#NODE_NAMES[@]} == SLURM_NNODES )) \
    || fail "the node list '$SLURM_JOB_NODELIST' expands to ${#NODE_NAMES[@]} names, SLURM_NNODES says $SLURM_NNODES"
HEAD_ADDR=$(getent hosts "${NODE_NAMES[0]}" | awk '{print $1; exit}') || true
[[ -n $HEAD_ADDR ]] || fail "the head node ${NODE_NAMES[0]} does not resolve (getent hosts): the nodes cannot meet \
there, and this script does not fall back to training on one node"
PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))

# The run directory, from the config as the trainer will read it (a broken config stops here, before any srun).
RUN_DIR=$("$PYTHON" -c 'import sys; from dist_lm.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).output_dir())' "$TRAIN_CONFIG" "$@") || exit 2
export ROOT PYTHON HEAD_ADDR PORT TRAIN_CONFIG ACCELERATE_CONFIG
export NUM_PROCESSES=$(( SLURM_NNODES * PROCS_PER_NODE ))
echo "dist_lm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${NODE_NAMES[*]}: $NUM_PROCESSES processes, \
head $HEAD_ADDR:$PORT, run_dir $RUN_DIR"

started=$(date +%s)
set +e
# Nodes other than the head wait (up to 5 minutes) until the head's launcher serves the rendezvous port: the head's
# launcher first checks that the port is free, and another launcher on the same host (two SLURM nodes on one
# machine, as in CI) could otherwise take it first.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'trap "" USR1
if [[ $SLURM_NODEID != 0 ]]; then
    for _ in $(seq 600); do (exec 3<>"/dev/tcp/$HEAD_ADDR/$PORT") 2>/dev/null && break; sleep 0.5; done
fi
exec "$PYTHON" -m accelerate.commands.launch -q --config_file "$ACCELERATE_CONFIG" --num_machines "$SLURM_NNODES" \
    --machine_rank "$SLURM_NODEID" --num_processes "$NUM_PROCESSES" --main_process_ip "$HEAD_ADDR" \
    --main_process_port "$PORT" --rdzv_backend c10d launch/train.py --config "$TRAIN_CONFIG" train.resume=auto "$@"' \
    bash "$@"
code=$?
set -e

# Requeue only on this attempt's own early stop: status.json written after it started, saying KILLED.
status=$("$PYTHON" -c 'import json, os, sys
path = os.path.join(sys.argv[1], "status.json")
fresh = os.path.exists(path) and os.path.getmtime(path) >= float(sys.argv[2])
print(json.load(open(path))["status"] if fresh else "NONE")' "$RUN_DIR" "$started")
if [[ $status == KILLED ]]; then
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    job=${job:-$SLURM_JOB_ID}
    echo "dist_lm: the run stopped early with a checkpoint; requeueing job $job"
    scontrol requeue "$job" || fail "scontrol requeue $job failed: submit the same script again, train.resume=auto \
continues the run"
    exit 0
fi
exit "$code"

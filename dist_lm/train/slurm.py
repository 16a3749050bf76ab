"""What a run takes from SLURM when it runs inside a SLURM job: the job's end time and the job's identity.

Design decisions:
- Read from the environment SLURM gives every task (SLURM_JOB_ID, SLURM_JOB_NODELIST, ...), an ecosystem
  convention; nothing here is needed outside SLURM, and every function returns None/{} there.
- The end time: SLURM_JOB_END_TIME (epoch seconds, set by newer SLURM), else `squeue -h -j JOB -o %e` (an ISO local
  time). Only the main process asks squeue (the trainer broadcasts the answer), so a large job does not send
  slurmctld one query per GPU. A job without a limit, or a squeue that cannot answer, gives None with one warning:
  the job's warning signal (launch/slurm/) still stops the run in time.
- The requeued job keeps its job id; SLURM_RESTART_COUNT says how many times it restarted.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime

from dist_lm.warn import warn_once


def in_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def seconds_left() -> float | None:
    """Seconds until the SLURM job's end (its time limit), or None outside a job or when it has no end."""
    if not in_job():
        return None
    end = os.environ.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        return int(end) - time.time()
    job = os.environ["SLURM_JOB_ID"]
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        warn_once(f"cannot read SLURM job {job}'s end time (squeue: {exc}); set train.time_limit to save before it")
        return None
    text = out.stdout.strip()
    if out.returncode != 0 or not text:
        warn_once(f"cannot read SLURM job {job}'s end time (squeue: {out.stderr.strip() or 'no answer'}); set "
                  "train.time_limit to save before it")
        return None
    try:
        return datetime.fromisoformat(text).timestamp() - time.time()  # squeue prints local time
    except ValueError:  # N/A, NONE, Unknown: a job with no time limit
        return None


def job_tags() -> dict[str, str]:
    """The job's identity for the MLflow run ({} outside SLURM): id, array task, node list, nodes, restarts."""
    names = {"slurm.job_id": "SLURM_JOB_ID", "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
             "slurm.array_task_id": "SLURM_ARRAY_TASK_ID", "slurm.nodelist": "SLURM_JOB_NODELIST",
             "slurm.num_nodes": "SLURM_NNODES", "slurm.restart_count": "SLURM_RESTART_COUNT",
             "slurm.job_name": "SLURM_JOB_NAME"}
    tags = {tag: os.environ[var] for tag, var in names.items() if os.environ.get(var)}
    if tags and "slurm.restart_count" not in tags:
        tags["slurm.restart_count"] = "0"  # SLURM sets it only once the job has restarted
    return tags

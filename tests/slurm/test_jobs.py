"""launch/slurm/ job scripts on a real SLURM cluster (the local one of tools/slurm_cluster.sh: nodes n1 and n2 on one
host, CPUs only, so the cpu_*.sbatch variants, DDP over gloo): train and checkpoint on one and two nodes, stop on the
warning signal, requeue, resume and finish, and fail with a message where the allocation cannot be resolved."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tokenizers" / "tinystories-10k"
SCRIPTS = ROOT / "launch" / "slurm"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from dist_lm.data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "tinystories-sample"
    prepare_shards("bundled:tinystories", TOKENIZER, out, log=lambda *_: None)
    return out


def overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """A small model on the bundled sample, tracking off (as tests/integration/conftest.tiny_run)."""
    return [f"run_dir={run_dir}", f"name={run_dir.name}", f"data.data_dir={shards}", f"data.tokenizer_dir={TOKENIZER}",
            "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.seq_len=32",
            "optim.warmup_steps=2", "optim.cosine_steps=20", "optim.lr=1e-2", "train.max_steps=6",
            "train.log_interval=2", "train.eval_interval=3", "train.eval_batches=2", "train.sample_tokens=0",
            "checkpoint.interval=3", "checkpoint.keep_last=0", "tracking.enabled=false", *extra]


def job_env() -> dict[str, str]:
    """What a job needs from this checkout: its path (jobs start in a temporary directory) and its dist_lm."""
    return {"DIST_LM_ROOT": str(ROOT), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def one_process(run_dir: Path, shards: Path, *extra: str) -> dict[int, float]:
    """The same run in one process, outside SLURM: what the jobs' losses must equal."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
           *overrides(run_dir, shards, *extra)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | job_env()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


@pytest.mark.parametrize("script, nodes", [("cpu_1node.sbatch", 1), ("cpu_multinode.sbatch", 2)])
def test_a_job_trains_checkpoints_and_matches_one_process(slurm, shards, tmp_path, script, nodes):
    """1 node x 2 processes, or 2 nodes x 1 process (one launcher per node, c10d rendezvous at the head node):
    per-process batch 4, global 8, the same losses as one process with batch 8."""
    run = tmp_path / "job"
    result = slurm.sbatch_wait(SCRIPTS / script, f"--output={tmp_path}/%j.out", env=job_env(), timeout=240,
                               script_args=overrides(run, shards, "train.batch_size=4"))
    info = slurm.job_info(result.job_id)
    out = slurm.output(result.job_id)
    assert result.returncode == 0 and info["JobState"] == "COMPLETED", out[-3000:]
    assert info["NumNodes"] == str(nodes) and "2 processes, head 127.0.0.1:" in out
    assert "2 process(es)" in out and "(DDP)" in out  # one process group over both nodes, not two of one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert json.loads((run / "status.json").read_text())["status"] == "FINISHED"
    ref = one_process(tmp_path / "one", shards, "train.batch_size=8")
    got = losses(run)
    print(f"\n{script}: " + " ".join(f"{k}={info[k]}" for k in ("JobId", "JobState", "Restarts", "NodeList",
                                                                     "NumNodes", "ExitCode"))
          + f"; max |loss - 1 process| {max(abs(got[s] - ref[s]) for s in ref):.2e}")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert max(abs(got[s] - ref[s]) for s in ref) < 1e-4, (got, ref)


def test_the_warning_signal_checkpoints_requeues_resumes_and_completes(slurm, shards, tmp_path):
    """scancel --signal=USR1 (what `#SBATCH --signal=USR1@...` sends before the time limit) to a running 2-node job:
    the workers stop at one agreed step with a checkpoint, the job requeues itself, the second run resumes there
    (train.resume=auto) and finishes: COMPLETED, Restarts=1, and every step's loss equals an uninterrupted job's."""
    long = ("train.max_steps=200", "optim.cosine_steps=200", "train.log_interval=1", "train.eval_interval=1000",
            "checkpoint.interval=1000", "train.batch_size=4")
    run = tmp_path / "job"
    db = tmp_path / "mlflow.db"
    tracked = (*long, "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=slurm",
               "tracking.system_metrics=true")
    export = "--export=ALL," + ",".join(f"{k}={v}" for k, v in job_env().items())
    submitted = slurm.run("sbatch", "--parsable", f"--output={tmp_path}/%j.out", export,
                          str(SCRIPTS / "cpu_multinode.sbatch"), *overrides(run, shards, *tracked))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split(";")[0].strip()
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 30:
            assert time.monotonic() < deadline, slurm.output(job)[-3000:]
            time.sleep(0.2)
        sent = slurm.run("scancel", "--signal=USR1", job)
        assert sent.returncode == 0, sent.stderr
        info = slurm.wait(job, timeout=240)  # through the requeue (PENDING is not final) to the second run's end
    finally:
        slurm.run("scancel", job)  # a no-op for a job that ended
    out = slurm.output(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out[-3000:])
    assert "stopped by SIGUSR1 after step" in out and "requeueing job" in out, out[-3000:]
    assert "resuming at step" in out and json.loads((run / "status.json").read_text())["status"] == "FINISHED"
    straight = tmp_path / "straight"
    result = slurm.sbatch_wait(SCRIPTS / "cpu_multinode.sbatch", f"--output={tmp_path}/%j.out", env=job_env(),
                               timeout=240, script_args=overrides(straight, shards, *long))
    assert result.returncode == 0, slurm.output(result.job_id)[-3000:]
    a, b = losses(straight), losses(run)
    stopped = int(out.split("stopped by SIGUSR1 after step ")[1].split("/")[0])
    print("\nrequeued job: " + " ".join(f"{k}={info[k]}" for k in ("JobId", "JobState", "Restarts", "NodeList",
                                                                     "NumNodes", "ExitCode"))
          + f"; stopped after step {stopped}, resumed to 200; steps differing from an uninterrupted job: "
          + str(sum(a[s] != b[s] for s in a if s in b)))
    assert sorted(a) == sorted(b) == list(range(1, 201))
    assert all(a[s] == b[s] or math.isclose(a[s], b[s], abs_tol=1e-6) for s in a), {
        s: (a[s], b[s]) for s in a if a[s] != b[s]}

    # One MLflow run for both attempts, telling the job it ran in and that it restarted once.
    con = sqlite3.connect(db)
    (run_id, status), = con.execute("select run_uuid, status from runs").fetchall()
    tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
    assert status == "FINISHED" and tags["slurm.job_id"] == job and tags["slurm.restart_count"] == "1", tags
    assert tags["slurm.num_nodes"] == "2" and tags["slurm.nodelist"] == "n[1-2]" and tags["num_processes"] == "2"
    steps = [s for (s,) in con.execute("select step from metrics where key = 'train/loss' order by step")]
    assert steps == list(range(1, 201))  # each step once, across the requeue
    # System metrics from both nodes, each under its SLURM name
    keys = {k for (k,) in con.execute("select distinct key from metrics where key like 'system/%'")}
    assert {f"system/{node}/{what}" for node in ("n1", "n2") for what in ("cpu_percent", "memory_used_GiB")} <= keys


def _job_sh(slurm, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """launch/slurm/job.sh as a batch script runs it, with the job's environment given by hand: what it does before
    it starts anything (find its nodes) needs no allocation."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "TRAIN_CONFIG": "configs/demo.yaml",
            "ACCELERATE_CONFIG": "configs/accelerate/cpu_ddp.yaml", "PROCS_PER_NODE": "1", "SLURM_JOB_ID": "77",
            "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
    if slurm.conf is not None:
        base["SLURM_CONF"] = str(slurm.conf)
    return subprocess.run(["/bin/bash", str(SCRIPTS / "job.sh")], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_a_node_list_that_does_not_resolve_fails_with_the_message(slurm, tmp_path):
    proc = _job_sh(slurm, {"SLURM_JOB_NODELIST": "nosuchnode[1-2]"}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: the head node nosuchnode1 does not resolve (getent hosts)" in proc.stderr
    assert "does not fall back to training on one node" in proc.stderr and "srun" not in proc.stderr


def test_without_scontrol_the_job_fails_with_the_message(slurm, tmp_path):
    proc = _job_sh(slurm, {"SLURM_JOB_NODELIST": "n[1-2]", "PATH": str(tmp_path)}, tmp_path)  # no SLURM commands here
    assert proc.returncode == 2, proc.stderr
    assert "error: scontrol is not on PATH" in proc.stderr and "bind them in" in proc.stderr

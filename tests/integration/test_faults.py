"""What clusters do to runs, done to real processes: signals to a worker or to the launcher, a launcher killed, a
rank stopped (SIGSTOP), two runs into one directory, a time limit. Each stopped run must have saved a checkpoint at
an agreed step from which `train.resume=latest` continues with the uninterrupted run's losses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import LONG, launch, ok, start, step_losses, tiny_run, wait_for_step

from dist_lm.cli import EXIT_STALLED, EXIT_STOPPED
from dist_lm.train.checkpoint import list_checkpoints


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's worker processes by rank."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and "launch/train.py" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def resume_matches(tmp_path: Path, data: Path, stopped: Path, *extra: str, accelerate_config: str | None = None):
    """Resume the stopped run to step `end` (a few steps past its checkpoint) and run the same steps straight
    through; the losses of every step must be the same."""
    end = status(stopped)["step"] + 4
    common = (f"train.max_steps={end}", "optim.cosine_steps=100000", "train.eval_interval=100000",
              "checkpoint.interval=100000", *extra)
    ok(launch(tiny_run(stopped, data, *common, "train.resume=latest"), cwd=tmp_path,
              accelerate_config=accelerate_config))
    straight = tmp_path / "straight"
    ok(launch(tiny_run(straight, data, *common), cwd=tmp_path, accelerate_config=accelerate_config))
    a, b = step_losses(straight), step_losses(stopped)
    assert sorted(a) == sorted(b) == list(range(1, end + 1))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_stops_the_worker_at_a_step_with_a_checkpoint_and_resume_continues_it(tmp_path, sample_shards, sig):
    run = tmp_path / "run"
    proc = start(run, sample_shards, *LONG)
    wait_for_step(run, 20, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    done = status(run)
    assert done["status"] == "KILLED" and done["reason"] == sig.name
    step = done["step"]
    assert (f"stopped by {sig.name} after step {step}/100000; checkpoint {run / 'checkpoints'}/step_{step:07d}; "
            "the same command with train.resume=latest continues the run") in out
    assert [p.name for p in list_checkpoints(run)] == [f"step_{step:07d}"]
    assert max(step_losses(run)) == step  # the steps since the last log line were logged before stopping
    resume_matches(tmp_path, sample_shards, run, accelerate_config=None)


def test_sigterm_to_the_launcher_reaches_the_worker_which_saves_before_exiting(tmp_path, sample_shards):
    run = tmp_path / "run"
    proc = start(run, sample_shards, *LONG, accelerate_config="single.yaml")
    wait_for_step(run, 20, proc)
    proc.send_signal(signal.SIGTERM)  # accelerate forwards it to the worker, and waits 5 s for it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # the launcher's own status for its signal
    done = status(run)
    assert done["status"] == "KILLED" and done["reason"] == "SIGTERM"
    assert list_checkpoints(run)[-1].name == f"step_{done['step']:07d}"


def test_two_ranks_agree_on_the_step_when_only_one_gets_the_signal(tmp_path, sample_shards):
    run = tmp_path / "run"
    two = ("train.batch_size=4",)
    proc = start(run, sample_shards, *LONG, *two, accelerate_config="cpu_ddp.yaml")
    wait_for_step(run, 20, proc)
    ranks = workers(proc)
    ranks[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns it through the stop check's all-reduce
    out, err = proc.communicate(timeout=90)
    assert status(run)["status"] == "KILLED" and status(run)["reason"] == "SIGTERM", err[-3000:]
    assert len(list_checkpoints(run)) == 1 and out.count("stopped by SIGTERM") == 1
    resume_matches(tmp_path, sample_shards, run, *two, accelerate_config="cpu_ddp.yaml")


def test_a_killed_launcher_leaves_no_orphan_training(tmp_path, sample_shards):
    """SIGKILL on the launcher: Linux sends its workers SIGTERM (the parent-death signal they asked for), and they
    stop together at an agreed step with a checkpoint instead of training on as orphans."""
    run = tmp_path / "run"
    proc = start(run, sample_shards, *LONG, "train.batch_size=4", accelerate_config="cpu_ddp.yaml")
    wait_for_step(run, 20, proc)
    ranks = list(workers(proc).values())
    assert len(ranks) == 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "workers outlived their launcher"
    done = status(run)
    assert done["status"] == "KILLED" and done["reason"] == "SIGTERM"
    assert list_checkpoints(run)[-1].name == f"step_{done['step']:07d}"


def test_a_stopped_rank_ends_the_job_within_the_stall_timeout(tmp_path, sample_shards):
    run = tmp_path / "run"
    proc = start(run, sample_shards, *LONG, "train.batch_size=4", "train.stall_timeout_s=5",
                 accelerate_config="cpu_ddp.yaml")
    wait_for_step(run, 20, proc)
    ranks = workers(proc)
    ranks[1].suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    stopped_at = time.monotonic()
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - stopped_at
    # rank 0 gives up after 5 s; the launcher then stops rank 1 (SIGTERM, SIGKILL after its 30 s grace)
    assert took < 5 + 30 + 15, took
    assert not any(p.is_running() for p in ranks.values())
    line = [x for x in err.splitlines() if x.startswith("error: a collective gave up")]
    assert len(line) == 1 and "train.stall_timeout_s=5 s" in line[0] and "Timed out" in line[0], err[-3000:]
    assert f"exitcode  : {EXIT_STALLED}" in err
    assert status(run)["status"] == "FAILED"


def test_a_second_run_into_the_same_directory_is_refused_and_the_first_goes_on(tmp_path, sample_shards):
    run = tmp_path / "run"
    first = start(run, sample_shards, "train.max_steps=300", "optim.cosine_steps=300", "train.log_interval=1",
                  "checkpoint.interval=100")
    wait_for_step(run, 5, first)
    second = launch(tiny_run(run, sample_shards, "train.max_steps=300", "optim.cosine_steps=300",
                             "optim.lr=3e-3"), cwd=tmp_path, accelerate_config=None)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run_dir {run} is in use by another run (pid {first.pid} on host" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 301))  # one run's rows only, each step once
    assert status(run)["status"] == "FINISHED"


def test_the_time_limit_saves_and_stops_before_it(tmp_path, sample_shards):
    run = tmp_path / "run"
    proc = start(run, sample_shards, *LONG, "train.time_limit=12")
    wait_for_step(run, 1, proc)
    first_step = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert time.monotonic() - first_step < 12, "the run went past its time limit"
    done = status(run)
    assert done["reason"] == "the time limit (train.time_limit)" and done["step"] > 1
    assert list_checkpoints(run)[-1].name == f"step_{done['step']:07d}"

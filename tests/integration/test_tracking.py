"""Tracking against a real `mlflow server` process started here: an outage in the middle of a run (the server
killed and started again) loses nothing and does not stall training; a server unreachable from the start costs
seconds, and backfill sends what it missed, once; the run's status tells the truth (FINISHED, KILLED on a signal,
back to RUNNING and FINISHED when resumed, FAILED with the error)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, checkout_env, launch, ok, start, step_losses, tiny_run

LONG = ("train.log_interval=5", "train.eval_interval=100000", "checkpoint.interval=100000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a sqlite store in `root`, on one port across restarts."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
               str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)  # its own process group
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start in {timeout} s: {(self.root / 'server.log').read_text()}")

    def kill(self) -> None:
        """What an outage is: the server and its workers gone at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow")
    srv.root.mkdir()
    yield srv
    srv.kill()


def start_job(run_dir: Path, data: Path, *extra: str) -> subprocess.Popen:
    """launch/train.py in a process group of its own (its pid is the group's), as a shell runs a job."""
    return start(run_dir, data, *extra, own_session=True)


def writer_process(trainer: subprocess.Popen) -> int:
    """The pid of the trainer's MLflow writer process."""
    found = subprocess.run(["pgrep", "-P", str(trainer.pid), "-f", "dist_lm.train.mlflow_process"],
                           capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")), default=0)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def mlflow_run(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow.json").read_text())["run_id"]


def test_an_outage_in_the_middle_loses_nothing_and_does_not_stop_training(tmp_path, sample_shards, server):
    server.start()
    run = tmp_path / "run"
    proc = start_job(run, sample_shards, "train.max_steps=400", "optim.cosine_steps=400", *LONG,
                     "tracking.enabled=true", f"tracking.tracking_uri={server.uri}")
    wait_until(lambda: logged_steps(run) >= 30, proc)
    server.kill()
    down_at = logged_steps(run)
    wait_until(lambda: logged_steps(run) >= down_at + 60, proc)  # training goes on while MLflow is away
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "does not answer" in out and "answers again" in out, out[-3000:]
    client = server.client()
    run_id = mlflow_run(run)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 401))  # every step, once
    values = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert values == pytest.approx(step_losses(run))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_unreachable_server_costs_seconds_and_backfill_sends_what_it_missed_once(tmp_path, sample_shards):
    srv = MlflowServer(tmp_path / "mlflow")
    srv.root.mkdir()
    quick = ("train.max_steps=20", "optim.cosine_steps=20")
    t0 = time.monotonic()
    ok(launch(tiny_run(tmp_path / "untracked", sample_shards, *quick), cwd=tmp_path, accelerate_config=None))
    without = time.monotonic() - t0
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = ok(launch(tiny_run(run, sample_shards, *quick, "tracking.enabled=true",
                              f"tracking.tracking_uri={srv.uri}"), cwd=tmp_path, accelerate_config=None))
    took = time.monotonic() - t0
    print(f"\n20-step run: {without:.1f} s untracked, {took:.1f} s with nothing listening at {srv.uri}")
    assert took < without + 10, (took, without)  # nothing listens: the run pays at most the last attempts
    assert "did not answer at the end" in proc.stdout and "launch/backfill_mlflow.py" in proc.stdout, proc.stdout
    assert not (run / "mlflow.json").exists()  # no MLflow run was ever created

    srv.start()
    try:
        backfill = [sys.executable, str(ROOT / "launch" / "backfill_mlflow.py"), "--run-dir", str(run),
                    "--tracking-uri", srv.uri]
        first = ok(subprocess.run(backfill, capture_output=True, text=True, env=checkout_env(), timeout=120))
        second = ok(subprocess.run(backfill, capture_output=True, text=True, env=checkout_env(), timeout=120))
        assert "sent 0 metric points" not in first.stdout and "sent 0 metric points" in second.stdout, (
            first.stdout, second.stdout)
        client = srv.client()
        run_id = mlflow_run(run)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(1, 21))
        info = client.get_run(run_id)
        assert info.info.status == "FINISHED" and info.data.params["optim.lr"] == "0.01"
    finally:
        srv.kill()


def test_status_killed_on_a_signal_running_again_when_resumed_then_finished(tmp_path, sample_shards, server):
    server.start()
    run = tmp_path / "run"
    tracked = ("tracking.enabled=true", f"tracking.tracking_uri={server.uri}")
    proc = start_job(run, sample_shards, "train.max_steps=100000", "optim.cosine_steps=100000", *LONG, *tracked)
    wait_until(lambda: logged_steps(run) >= 20 and (run / "mlflow.json").exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, the MLflow writer process too
    proc.communicate(timeout=120)
    client = server.client()
    run_id = mlflow_run(run)
    assert client.get_run(run_id).info.status == "KILLED"
    stopped = json.loads((run / "status.json").read_text())["step"]

    # The writer process reopens the run beside the training process, so RUNNING shows a moment after training goes
    # on (on the 2-core CI VM, more than 10 steps later): the resumed run is long enough to be seen running.
    more = 100
    resumed = start_job(run, sample_shards, f"train.max_steps={stopped + more}", "optim.cosine_steps=100000", *LONG,
                        *tracked, "train.resume=latest")
    wait_until(lambda: client.get_run(run_id).info.status == "RUNNING", resumed)
    assert resumed.wait(timeout=120) == 0
    assert mlflow_run(run) == run_id and client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, stopped + more + 1))
    # what the run records: the code's commit, the device, the processes, each checkpoint's path
    tags = client.get_run(run_id).data.tags
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == head and tags["git_dirty"] in ("true", "false")
    assert (tags["device"], tags["num_processes"], tags["num_machines"]) == ("cpu", "1", "1")
    for step in (stopped, stopped + more):
        assert tags[f"checkpoint.step_{step}"] == str((run / "checkpoints" / f"step_{step:07d}").resolve())


def test_a_failed_run_ends_failed_with_its_error(tmp_path, sample_shards, server):
    server.start()
    run = tmp_path / "run"
    proc = launch(tiny_run(run, sample_shards, "optim.lr=1e6", "optim.grad_clip=0", "tracking.enabled=true",
                           f"tracking.tracking_uri={server.uri}"), cwd=tmp_path, accelerate_config=None)
    assert proc.returncode == 2 and "training loss became" in proc.stderr, proc.stderr[-2000:]
    info = server.client().get_run(mlflow_run(run))
    assert info.info.status == "FAILED" and info.data.tags["error"].startswith("FloatingPointError: training loss")
    assert json.loads((run / "status.json").read_text())["status"] == "FAILED"


def test_resuming_into_a_store_without_the_run_starts_a_new_one_and_backfill_keeps_a_finished_status(
        tmp_path, sample_shards):
    """A resumed run whose MLflow run the store no longer holds (mlflow.db deleted, another store at that URI) logs
    into a new run instead of retrying forever; backfill leaves a finished run's status alone."""
    db = tmp_path / "mlflow.db"
    tracked = ("tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{db}")
    run = tmp_path / "run"
    ok(launch(tiny_run(run, sample_shards, *tracked), cwd=tmp_path, accelerate_config=None))
    old_id = mlflow_run(run)
    db.unlink()
    resumed = ok(launch(tiny_run(run, sample_shards, *tracked, "train.max_steps=9", "train.resume=latest"),
                        cwd=tmp_path, accelerate_config=None))
    assert f"has no run {old_id} to continue" in resumed.stdout, resumed.stdout[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    new_id = mlflow_run(run)
    assert new_id != old_id and client.get_run(new_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(new_id, "train/loss")) == [7, 8, 9]

    (run / "status.json").unlink()  # backfill without a final status to set: the run's own stays
    backfill = [sys.executable, str(ROOT / "launch" / "backfill_mlflow.py"), "--run-dir", str(run)]
    done = ok(subprocess.run(backfill, capture_output=True, text=True, env=checkout_env(), timeout=120))
    assert client.get_run(new_id).info.status == "FINISHED", done.stdout
    assert sorted(m.step for m in client.get_metric_history(new_id, "train/loss")) == list(range(1, 10))


def sqlite_tracking(tmp_path: Path) -> tuple[str, ...]:
    return ("tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_trainer_killed_without_a_word_leaves_its_run_killed_with_what_it_logged(tmp_path, sample_shards):
    """SIGKILL (or the OOM killer) gives the trainer no chance to end its MLflow run: its writer process sees the
    pipe close, sends what it was handed, and ends the run KILLED, saying why."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    proc = start_job(run, sample_shards, "train.max_steps=100000", "optim.cosine_steps=100000", *LONG,
                     *sqlite_tracking(tmp_path))
    wait_until(lambda: logged_steps(run) >= 20 and (run / "mlflow.json").exists(), proc)
    writer = writer_process(proc)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{writer}").exists():  # the writer's last sends and its exit
        assert time.monotonic() < deadline, "the writer process did not end after its trainer was killed"
        time.sleep(0.2)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = client.get_run(mlflow_run(run))
    assert info.info.status == "KILLED" and "ended without ending the run" in info.data.tags["killed"]
    sent = {m.step for m in client.get_metric_history(info.info.run_id, "train/loss")}
    logged = {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if line.endswith("}") and "train/loss" in line}  # the kill may cut the last line short
    assert len(logged) >= 20 and logged <= sent  # every step the trainer logged reached MLflow


def test_a_dead_writer_process_costs_the_run_nothing_and_backfill_sends_the_rest(tmp_path, sample_shards):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    proc = start_job(run, sample_shards, "train.max_steps=150", "optim.cosine_steps=150", *LONG,
                     *sqlite_tracking(tmp_path))
    wait_until(lambda: logged_steps(run) >= 20 and (run / "mlflow.json").exists(), proc)
    os.kill(writer_process(proc), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("the MLflow writer process stopped") == 1 and "launch/backfill_mlflow.py" in out, out[-3000:]
    assert sorted(step_losses(run)) == list(range(1, 151))  # metrics.jsonl has every step

    backfill = [sys.executable, str(ROOT / "launch" / "backfill_mlflow.py"), "--run-dir", str(run)]
    ok(subprocess.run(backfill, capture_output=True, text=True, env=checkout_env(), timeout=120))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow_run(run)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 151))
    assert client.get_run(run_id).info.status == "FINISHED"

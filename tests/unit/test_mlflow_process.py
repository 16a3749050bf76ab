"""The MLflow writer process against a real sqlite store: the training side never blocks on it, not even while
the process is stopped (SIGSTOP), and what it was handed meanwhile reaches MLflow once it runs again."""

import os
import signal
import threading

from mlflow.tracking import MlflowClient

from dist_lm.train.mlflow_process import MlflowProcess
from dist_lm.train.tracking import MlflowTracker


def test_a_stopped_writer_process_never_blocks_the_caller_and_loses_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    said: list[str] = []
    writer = MlflowProcess(MlflowTracker(uri, "writer", "run", open_now=False), run_dir=tmp_path, say=said.append)
    os.kill(writer._proc.pid, signal.SIGSTOP)
    steps = 20_000  # ~1 MB of JSON lines: far more than a pipe holds
    try:
        def log_all() -> None:
            for step in range(1, steps + 1):
                writer.submit("rows", [(step, {"train/loss": 1.0 / step, "train/lr": 1e-3})])

        caller = threading.Thread(target=log_all, daemon=True)
        caller.start()
        caller.join(timeout=60)
        assert not caller.is_alive(), "submit blocked on a writer process that does not read"
        assert len(writer._buffer) > 0  # the pipe was full: the rest waits on this side
    finally:
        os.kill(writer._proc.pid, signal.SIGCONT)
    assert writer.close("FINISHED") == 0 and said == []
    client = MlflowClient(uri)
    history = client.get_metric_history(writer.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert client.get_run(writer.run_id).info.status == "FINISHED"


def test_the_writer_process_reads_nan_and_infinite_values_and_odd_params(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = MlflowProcess(MlflowTracker(uri, "writer", "run", open_now=False), run_dir=tmp_path, say=print)
    writer.submit("params", {"run_dir": tmp_path, "model.d_model": 32, "data.splits": ("train", "val"), "x": None})
    writer.submit("rows", [(1, {"train/loss": float("nan")}), (2, {"train/loss": float("inf")})])
    assert writer.close("FAILED", {"error": "FloatingPointError: training loss became nan"}) == 0
    run = MlflowClient(uri).get_run(writer.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("FloatingPointError")
    assert run.data.params["run_dir"] == str(tmp_path) and run.data.params["data.splits"] == "['train', 'val']"
    values = [m.value for m in MlflowClient(uri).get_metric_history(writer.run_id, "train/loss")]
    assert len(values) == 2 and values[0] != values[0] and values[1] >= 1.7e308  # the store keeps inf as the top float


def test_a_process_forked_from_the_trainer_does_not_hold_the_writer_pipe(tmp_path):
    """The writer learns that its trainer died from the end of the pipe; a forked copy (a data loader worker) that
    kept the pipe open would put that off until it exits."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = MlflowProcess(MlflowTracker(uri, "writer", "run", open_now=False), run_dir=tmp_path, say=print)
    pid = os.fork()
    if pid == 0:  # the forked copy: its end of the pipe must be closed, and nothing it does reaches MLflow
        writer.submit("rows", [(99, {"train/loss": 9.0})])
        os._exit(0 if writer._proc.stdin.closed else 1)
    assert os.waitpid(pid, 0)[1] == 0
    writer.submit("rows", [(1, {"train/loss": 1.0})])
    assert writer.close("FINISHED") == 0
    assert [m.step for m in MlflowClient(uri).get_metric_history(writer.run_id, "train/loss")] == [1]

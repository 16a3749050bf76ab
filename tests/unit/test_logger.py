"""RunLogger, the run's one sink: each row reaches the console, metrics.jsonl and a real MLflow store once."""

import json

import pytest
from mlflow.tracking import MlflowClient

from dist_lm.train.logger import METRICS_FILE, RunLogger
from dist_lm.train.tracking import MlflowTracker, NullTracker


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_a_row_goes_to_the_console_the_file_and_mlflow_once(tmp_path, capsys):
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "sink", "run", open_now=False)
    logger = RunLogger(tmp_path, tracker=tracker, is_main=True, start_step=0, max_steps=30)
    logger.log(3, {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "epoch": 0.1,
                   "perf/tokens_per_s": 12345.6, "perf/mfu": 0.42},
               earlier={2: {"train/loss": 2.75}, 1: {"train/loss": 3.0}})
    logger.log(3, {"val/loss": 2.6})
    logger.close("FINISHED")

    out = capsys.readouterr().out.splitlines()
    assert out == ["step      3/30 | loss 2.5000 | lr 1.00e-03 | grad norm 0.500 | 12,346 tok/s | mfu 42.0%",
                   "step      3/30 | val loss 2.6000"]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # earlier rows first, in step order
    assert rows[2]["train/loss"] == 2.5 and rows[2]["perf/mfu"] == 0.42 and rows[3] == {"step": 3, "val/loss": 2.6}

    # the writer process opened the run and said which; this process made no MLflow call
    run_id = logger.run_id
    assert run_id and json.loads((tmp_path / "mlflow.json").read_text())["run_id"] == run_id
    assert tracker._client is None and tracker.run_id is None
    client = MlflowClient(tracker.uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.75), (3, 2.5)]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [3]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_the_compile_row_and_rows_without_console_fields(tmp_path, capsys):
    logger = RunLogger(tmp_path, tracker=NullTracker(), is_main=True, start_step=10, max_steps=20)
    logger.log(12, {"perf/compile_and_first_step_s": 31.07})
    logger.log(12, {"epoch": 0.5})  # nothing the console shows: no line
    logger.close("FINISHED")
    assert capsys.readouterr().out.splitlines() == ["torch.compile + first 2 step(s): 31.1 s"]
    assert _rows(tmp_path) == [{"step": 12, "perf/compile_and_first_step_s": 31.07}, {"step": 12, "epoch": 0.5}]


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = RunLogger(tmp_path, tracker=NullTracker(), is_main=False, start_step=0, max_steps=5)
    logger.log(1, {"train/loss": 1.0})
    logger.say("only the main process speaks")
    logger.close("FINISHED")
    assert capsys.readouterr().out == "" and not (tmp_path / METRICS_FILE).exists()


def test_a_resumed_run_cuts_the_file_back_to_its_checkpoint(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.9}\n{"step": 3, "train/lo')
    with pytest.warns(RuntimeWarning, match="dropping an unreadable line"):
        logger = RunLogger(tmp_path, tracker=NullTracker(), is_main=True, start_step=1, max_steps=5)
    logger.log(2, {"train/loss": 2.8})
    logger.close("FINISHED")
    assert _rows(tmp_path) == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.8}]

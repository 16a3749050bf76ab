"""dist_lm.train.compare and compare_sources on real files: MLflow sqlite stores written through MlflowClient and
dist_lm's tracker, metrics.jsonl and status.json files as the trainer writes them."""

import doctest
import json
import time

import pytest
from mlflow.entities import Metric

from dist_lm.train import compare_sources
from dist_lm.train.compare import format_table, plot_losses, plot_series, use_log_x
from dist_lm.train.compare_sources import collect_runs, read_jsonl_runs, read_mlflow_runs, run_status
from dist_lm.train.logger import write_status
from dist_lm.train.tracking import MlflowTracker


def test_module_doctests():
    assert doctest.testmod(compare_sources).failed == 0


def _log(client, run_id, step, metrics, at_ms):
    client.log_batch(run_id, [Metric(k, v, at_ms, step) for k, v in metrics.items()])


def test_a_resumed_runs_attempts_merge_into_one_curve_the_last_logged_value_winning(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "cmp", "resumed")
    tracker.log_params({"global_batch_size": 16, "model.seq_len": 32, "run_dir": str(tmp_path / "nowhere")})
    client, run_id, t0 = tracker._client, tracker.run_id, 1_700_000_000_000
    # first attempt: steps 1-5, val at 4; it died after its checkpoint at step 3
    for step in range(1, 6):
        _log(client, run_id, step, {"train/loss": 10.0 - step, "train/tokens": step * 512.0}, t0 + step * 1000)
    _log(client, run_id, 4, {"val/loss": 6.5}, t0 + 4500)
    # the resumed attempt redoes 4-5 (other values: what matters is which one wins) and goes on to 6
    for step in range(4, 7):
        _log(client, run_id, step, {"train/loss": 20.0 - step, "train/tokens": step * 512.0}, t0 + 60_000 + step)
    _log(client, run_id, 4, {"val/loss": 16.5}, t0 + 60_010)
    tracker.close("FINISHED")

    [run] = read_mlflow_runs(uri, "cmp")
    assert run.train.steps == [1, 2, 3, 4, 5, 6]  # each step once, in order: no zig-zag
    assert run.train.values == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]
    assert run.train.tokens == [512.0 * s for s in range(1, 7)] and not run.tokens_estimated
    assert (run.val.steps, run.val.values, run.val.tokens) == ([4], [16.5], [2048.0])
    assert run.status == "FINISHED" and run.final_train_loss == 14.0 and run.tokens_trained == 3072.0


def test_tokens_fall_back_to_step_x_global_batch_x_seq_len_and_say_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = MlflowTracker(uri, "cmp", "old")  # from before train/tokens was logged
    old.log_params({"global_batch_size": 16, "model.seq_len": 32})
    for step, loss in enumerate([9.0, 8.0, 7.0], 1):
        old.log_metrics({"train/loss": loss}, step=step)
    old.log_metrics({"val/loss": 7.2}, step=3)
    old.close()
    bare = MlflowTracker(uri, "cmp", "bare")  # nor the params to estimate them
    bare.log_metrics({"train/loss": 9.5}, step=1)
    bare.close()

    old_run, bare_run = read_mlflow_runs(uri, "cmp")
    assert old_run.train.tokens == [512.0, 1024.0, 1536.0] and old_run.val.tokens == [1536.0]
    assert old_run.tokens_estimated and bare_run.train.tokens is None
    table = format_table([old_run, bare_run]).splitlines()
    assert "1,536 (estimated)" in table[2] and table[3].startswith("bare")

    said = []
    axis, drawn = plot_series([old_run, bare_run], "tokens")
    assert axis == "tokens" and [r.name for r, *_ in drawn] == ["old"]
    assert drawn[0][1] == ([512.0, 1024.0, 1536.0], [9.0, 8.0, 7.0])
    plot_losses([old_run, bare_run], tmp_path / "p.png", say=said.append)
    assert said == ["left out of the plot against tokens (no train/tokens logged, no global_batch_size param): bare; "
                    "--x steps shows them"]
    assert plot_series([bare_run], "tokens")[0] == "steps"  # nobody has tokens: the axis becomes steps
    assert [r.name for r, *_ in plot_series([old_run, bare_run], "steps")[1]] == ["old", "bare"]


def test_runs_with_one_name_get_their_short_id(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = []
    for lr in ("1e-3", "3e-3"):
        tracker = MlflowTracker(uri, "cmp", "twin")
        tracker.log_params({"optim.lr": lr, "name": "twin", "run_dir": f"runs/{lr}"})
        tracker.log_metrics({"train/loss": 5.0}, step=1)
        tracker.close()
        ids.append(tracker.run_id)
    runs = read_mlflow_runs(uri, "cmp")
    assert [r.name for r in runs] == [f"twin ({ids[0][:8]})", f"twin ({ids[1][:8]})"]  # oldest first
    header = format_table(runs).splitlines()[0]
    assert "optim.lr" in header and "run_dir" not in header  # the run column already tells them apart


def test_status_json_newer_than_the_last_metric_corrects_a_store_left_running(tmp_path):
    ended = {"status": "KILLED", "reason": "SIGTERM", "step": 20}
    assert run_status("RUNNING", ended, 1000.0, 999.9) == "KILLED (SIGTERM at step 20; MLflow: RUNNING)"
    assert run_status("RUNNING", ended, 1000.0, 1000.7) == "KILLED (SIGTERM at step 20; MLflow: RUNNING)"  # 1 s res.
    assert run_status("RUNNING", ended, 1000.0, 1012.0) == "RUNNING"  # a resumed attempt has logged since
    assert run_status("KILLED", ended, 1000.0, 999.0) == "KILLED (SIGTERM at step 20)"
    assert run_status("FINISHED", {"status": "FINISHED", "step": 6}, 1000.0, 999.0) == "FINISHED"
    assert run_status("FAILED", ended, 1000.0, 999.0) == "FAILED"  # a final store status is not overruled
    assert run_status("RUNNING", None, None, 999.0) == "RUNNING"
    assert run_status(None, {"status": "FAILED", "reason": None, "step": 7}, 1000.0, 990.0) == "FAILED (at step 7)"

    # the same through a store and the status.json the trainer's logger writes, found through the run_dir param
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "cmp", "gone")
    tracker.log_params({"run_dir": str(tmp_path / "gone"), "name": "gone"})
    tracker.log_metrics({"train/loss": 5.0}, step=20)  # the process then died without closing the MLflow run
    (tmp_path / "gone").mkdir()
    time.sleep(1.1)
    write_status(tmp_path / "gone", "KILLED", step=20, reason="SIGTERM", checkpoint=None)
    [run] = read_mlflow_runs(uri, "cmp")
    assert run.status == "KILLED (SIGTERM at step 20; MLflow: RUNNING)"


def _write_run(run_dir, rows, *, batch_size=8, seq_len=32, experiment="cmp"):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"name: {run_dir.name}\nrun_dir: {run_dir}\nmodel:\n  seq_len: {seq_len}\n  d_model: 32\n"
        f"optim:\n  lr: 0.01\ntrain:\n  batch_size: {batch_size}\n  grad_accum_steps: 1\n"
        f"tracking:\n  experiment: {experiment}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_metrics_jsonl_source(tmp_path):
    runs = tmp_path / "runs"
    # two processes of batch 8: 512 tokens a step; a resumed run's file repeats steps 3-4 (last wins), and its last
    # line is being written
    _write_run(runs / "two", [{"step": s, "train/loss": 9.0 - s, "train/tokens": 512 * s} for s in (1, 2, 3, 4)]
               + [{"step": 4, "val/loss": 5.0}]
               + [{"step": s, "train/loss": 8.5 - s, "train/tokens": 512 * s} for s in (3, 4, 5)])
    with (runs / "two" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/lo')
    write_status(runs / "two", "FINISHED", step=5, reason=None, checkpoint=None)
    time.sleep(0.05)
    _write_run(runs / "other", [{"step": 1, "train/loss": 9.0}], experiment="elsewhere")

    [run] = read_jsonl_runs(runs, "cmp")
    assert run.train.steps == [1, 2, 3, 4, 5] and run.train.values == [8.0, 7.0, 5.5, 4.5, 3.5]
    assert run.train.tokens == [512, 1024, 1536, 2048, 2560] and run.val.tokens == [2048]
    assert run.params["optim.lr"] == "0.01" and run.params["model.seq_len"] == "32"
    assert run.params["num_processes"] == "2" and run.params["global_batch_size"] == "16"
    assert run.status == "FINISHED" and run.name == "two"
    assert [r.name for r in read_jsonl_runs(runs)] == ["two", "other"]
    assert read_jsonl_runs(runs, max_runs=1)[0].name == "other"  # the one that logged last
    assert read_jsonl_runs(runs)[1].status == "RUNNING"  # no status.json: nothing says it ended

    # a sqlite store that does not exist is not created: the runs come from runs/, with a line that says so
    said = []
    missing = tmp_path / "none.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        found = collect_runs(f"sqlite:///{missing}", None, 10, say=said.append)
    assert [r.name for r in found] == ["two", "other"] and not missing.exists()
    assert said == [f"no MLflow store at {missing}; reading runs/*/metrics.jsonl instead"]


def test_log_x_only_for_runs_of_very_different_lengths():
    assert not use_log_x([1_000_000, 2_000_000])  # each spans >2 decades from step 1, but they end together
    assert use_log_x([100_000, 20_000_000])
    assert not use_log_x([])

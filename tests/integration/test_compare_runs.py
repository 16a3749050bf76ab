"""launch/compare_runs.py against real MLflow sqlite stores, written by our tracker and by real trainer runs (1 and
2 processes, stopped by SIGTERM and resumed), and against the runs' own metrics.jsonl."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LONG, ROOT, checkout_env, launch, ok, start, tiny_run, wait_for_step

from dist_lm.cli import EXIT_STOPPED
from dist_lm.train.compare import collect_runs, loss_figure, plot_series
from dist_lm.train.tracking import MlflowTracker


def test_table_and_plot_from_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name, lr, losses in (("lr-small", 1e-4, [9.0, 8.0, 7.5]), ("lr-big", 1e-3, [9.0, 6.0, 4.0])):
        tracker = MlflowTracker(uri, "cmp", name)
        tracker.log_params({"optim.lr": lr, "model.d_model": 64})
        for step, loss in enumerate(losses, 1):
            tracker.log_metrics({"train/loss": loss}, step=step)
        tracker.log_metrics({"val/loss": losses[-1] + 0.1, "perf/tokens_per_s": 1234.0}, step=3)
        tracker.close()
    png = tmp_path / "losses.png"
    proc = ok(subprocess.run([sys.executable, str(ROOT / "launch" / "compare_runs.py"), "--experiment", "cmp",
                              "--tracking-uri", uri, "--plot", str(png)], capture_output=True, text=True,
                             timeout=120, env=checkout_env()))
    lines = proc.stdout.splitlines()
    assert "optim.lr" in lines[0] and "model.d_model" not in lines[0]  # only the params that differ
    big = next(line for line in lines if line.startswith("lr-big"))
    assert "0.001" in big and "4.0000" in big and "4.1000" in big and "1,234" in big
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "compare_runs.py"), "--experiment", "nope",
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                          env=checkout_env())
    assert proc.returncode == 2 and "no MLflow experiment 'nope'" in proc.stderr and "cmp" in proc.stderr


def test_plot_to_an_unknown_format_is_a_user_error(tmp_path):
    from dist_lm.errors import UserError
    from dist_lm.train.compare import plot_losses

    with pytest.raises(UserError, match=r"losses\.xyz.*\.png"):
        plot_losses([], tmp_path / "losses.xyz")
    assert not (tmp_path / "losses.xyz").exists()


# ----------------------------------------------------------------------------------------------
# Real trainer runs into one store: two world sizes, two runs of one name, a run stopped and resumed, a run left
# stopped.

TRACK = ("tracking.enabled=true", "tracking.experiment=cmp")
COMPARE = [sys.executable, str(ROOT / "launch" / "compare_runs.py")]


def compare(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return ok(subprocess.run([*COMPARE, *args], capture_output=True, text=True, timeout=120, env=checkout_env(),
                             cwd=cwd))


def cells(table: str) -> list[list[str]]:
    """The table's lines split into stripped cells (header first, the rule line and what follows the table left
    out, such as the plot's path)."""
    lines = [line for line in table.splitlines() if " | " in line or line.startswith("-")]
    return [[c.strip() for c in line.split(" | ")] for line in lines[:1] + lines[2:]]


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory, sample_shards) -> tuple[Path, str]:
    """One store, four finished runs of 6 steps under base/runs: one-proc (1 process, batch 8), two-proc (2
    processes, batch 8 each: twice the tokens per step), and two runs both named 'twin' (another lr for one)."""
    base = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    for run, accelerate_config, extra in (("one-proc", "single.yaml", ()), ("two-proc", "cpu_ddp.yaml", ()),
                                          ("twin-a", "single.yaml", ("name=twin", "optim.lr=5e-3")),
                                          ("twin-b", "single.yaml", ("name=twin",))):
        ok(launch(tiny_run(base / "runs" / run, sample_shards, *TRACK, f"tracking.tracking_uri={uri}", *extra),
                  accelerate_config=accelerate_config, cwd=base))
    return base, uri


def test_runs_of_two_world_sizes_line_up_against_tokens(four_runs, tmp_path):
    base, uri = four_runs
    runs = {r.name: r for r in collect_runs(uri, "cmp")}
    one, two = runs["one-proc"], runs["two-proc"]
    steps = list(range(1, 7))
    assert one.train.steps == two.train.steps == steps
    assert one.train.tokens == [s * 8 * 32 for s in steps]  # steps x global batch x seq_len, as logged
    assert two.train.tokens == [s * 16 * 32 for s in steps]
    assert two.val.steps == [3, 6] and two.val.tokens == [3 * 16 * 32, 6 * 16 * 32]
    assert not (one.tokens_estimated or two.tokens_estimated)
    axis, drawn = plot_series([one, two], "tokens")
    (_, (x1, _), _), (_, (x2, _), _) = drawn
    assert axis == "tokens" and x2[-1] == 2 * x1[-1] == 6 * 16 * 32
    _, [(_, (s1, _), _), (_, (s2, _), _)] = plot_series([one, two], "steps")
    assert s1 == s2 == steps

    png, steps_png = tmp_path / "tokens.png", tmp_path / "steps.png"
    table = cells(compare("--experiment", "cmp", "--tracking-uri", uri, "--plot", str(png)).stdout)
    header, rows = table[0], {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    assert {"num_processes", "global_batch_size", "optim.lr"} <= set(header) and "model.d_model" not in header
    assert rows["two-proc"]["num_processes"] == "2" and rows["two-proc"]["global_batch_size"] == "16"
    assert rows["two-proc"]["tokens trained"] == "3,072" and rows["one-proc"]["tokens trained"] == "1,536"
    assert rows["two-proc"]["status"] == "FINISHED"
    assert rows["two-proc"]["val loss"] == f"{two.final_val_loss:.4f}"
    compare("--experiment", "cmp", "--tracking-uri", uri, "--x", "steps", "--plot", str(steps_png))
    for path in (png, steps_png):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_two_runs_with_one_name_get_two_entries(four_runs):
    base, uri = four_runs
    runs = collect_runs(uri, "cmp")
    twins = [r for r in runs if r.params["name"] == "twin"]
    assert sorted(r.name for r in twins) == sorted(f"twin ({r.id[:8]})" for r in twins) and len(twins) == 2
    legend = loss_figure(runs).axes[0].get_legend()  # the runs' legend (the other one names the line styles)
    labels = [t.get_text().split(":")[0] for t in legend.get_texts()]
    assert labels == [r.name for r in runs] and len(set(labels)) == 4
    table = cells(compare("--experiment", "cmp", "--tracking-uri", uri).stdout)
    assert sorted(row[0] for row in table[1:] if row[0].startswith("twin")) == sorted(r.name for r in twins)


def test_the_same_table_from_runs_metrics_jsonl_without_a_store(four_runs):
    base, uri = four_runs
    from_mlflow = cells(compare("--experiment", "cmp", "--tracking-uri", uri).stdout)
    from_files = cells(compare("--experiment", "cmp", "--runs-dir", str(base / "runs")).stdout)
    missing = base / "none.db"
    fallback = compare("--tracking-uri", f"sqlite:///{missing}", cwd=base)
    assert fallback.stderr.strip().splitlines()[-1] == (f"no MLflow store at {missing}; reading runs/*/metrics.jsonl "
                                                       "instead")
    assert not missing.exists()
    # the same rows but for the run column: a shared name is followed by the run's id there, its directory here
    assert [row[1:] for row in from_files] == [row[1:] for row in from_mlflow] == [row[1:] for row in
                                                                                   cells(fallback.stdout)]
    assert [row[0] for row in from_files] == ["run", "one-proc", "two-proc", "twin (twin-a)", "twin (twin-b)"]


def test_a_run_stopped_and_resumed_is_one_curve_and_a_run_left_stopped_shows_why(tmp_path, sample_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = (*TRACK, f"tracking.tracking_uri={uri}")
    resumed, stopped = tmp_path / "runs" / "resumed", tmp_path / "runs" / "stopped"
    procs = {run: start(run, sample_shards, *LONG, *track) for run in (resumed, stopped)}
    for run, proc in procs.items():
        wait_for_step(run, 10, proc)
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_STOPPED, err[-3000:]
    step = {run: json.loads((run / "status.json").read_text())["step"] for run in procs}
    runs = {r.name: r for r in collect_runs(uri, "cmp")}
    assert runs["resumed"].status == f"KILLED (SIGTERM at step {step[resumed]})"

    end = step[resumed] + 4
    ok(launch(tiny_run(resumed, sample_shards, *track, f"train.max_steps={end}", "optim.cosine_steps=100000",
                       "train.eval_interval=100000", "checkpoint.interval=100000", "train.resume=latest"),
              cwd=tmp_path))
    # a store that missed the end of the stopped run (as if it had been down then) still says RUNNING
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).update_run(runs["stopped"].id, status="RUNNING")
    killed = f"KILLED (SIGTERM at step {step[stopped]}"
    for source, stopped_status in ((collect_runs(uri, "cmp"), f"{killed}; MLflow: RUNNING)"),
                                   (collect_runs(uri, "cmp", runs_dir=tmp_path / "runs"), f"{killed})")):
        runs = {r.name: r for r in source}
        assert runs["resumed"].train.steps == list(range(1, end + 1))  # both attempts, each step once
        assert runs["resumed"].train.tokens == [s * 8 * 32 for s in range(1, end + 1)]
        assert runs["resumed"].status == "FINISHED" and runs["resumed"].val.steps == [end]
        assert runs["stopped"].status == stopped_status
    table = cells(compare("--experiment", "cmp", "--tracking-uri", uri).stdout)
    assert sorted(row[:2] for row in table[1:]) == [["resumed", "FINISHED"],
                                                    ["stopped", f"{killed}; MLflow: RUNNING)"]]


def test_a_run_logged_without_train_tokens_is_placed_by_its_params_and_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "old", "before-tokens")  # what a trainer before train/tokens logged
    tracker.log_params({"global_batch_size": 16, "model.seq_len": 32, "num_processes": 2})
    for step, loss in enumerate([9.0, 8.0, 7.5], 1):
        tracker.log_metrics({"train/loss": loss}, step=step)
    tracker.log_metrics({"val/loss": 7.6}, step=3)
    tracker.close()
    png = tmp_path / "old.png"
    table = cells(compare("--experiment", "old", "--tracking-uri", uri, "--plot", str(png)).stdout)
    assert dict(zip(*table))["tokens trained"] == "1,536 (estimated)"  # 3 steps x 16 x 32
    [run] = collect_runs(uri, "old")
    assert run.train.tokens == [512, 1024, 1536] and run.tokens_estimated
    label = loss_figure([run]).axes[0].get_legend().get_texts()[0].get_text()
    assert label == "before-tokens: FINISHED, val 7.600, tokens estimated"
    assert png.stat().st_size > 10_000

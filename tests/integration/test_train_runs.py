"""Whole runs through `accelerate launch`: the demo path, DDP over gloo, accumulation, exact resume."""

import json
import math
import re
import shutil
import sqlite3

import pytest
from conftest import ROOT, checkout_env, launch, ok, step_losses, tiny_run, val_losses


def test_demo_path_end_to_end_with_mlflow_and_generation(tmp_path, sample_shards):
    run = tmp_path / "runs" / "e2e"
    db = tmp_path / "mlflow.db"
    proc = ok(launch(tiny_run(run, sample_shards, "tracking.enabled=true", "train.sample_tokens=20",
                              "tracking.experiment=e2e"),
                     cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}))
    assert "mlflow ui --backend-store-uri" in proc.stdout + proc.stderr
    assert (run / "config.yaml").is_file()
    for step in ("step_0000003", "step_0000006"):
        assert sorted(p.name for p in (run / "checkpoints" / step).iterdir()) == [
            "model.safetensors", "optimizer.safetensors", "state.json"]
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert abs(losses[1] - math.log(10000)) < 1.0  # starts near ln(vocab)

    # The MLflow store is real: params are the flattened config, metrics carry their steps.
    con = sqlite3.connect(db)
    params = dict(con.execute("select key, value from params").fetchall())
    assert params["optim.lr"] == "0.01" and params["model.d_model"] == "32"
    steps = [s for (s,) in con.execute("select step from metrics where key='train/loss' order by step")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert con.execute("select status from runs").fetchone()[0] == "FINISHED"

    # Generation from the safetensors checkpoint: seeded, so the same seed gives the same text.
    import subprocess
    import sys

    def gen(seed):
        cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), "--checkpoint", str(run), "--prompt",
               "Once upon a time", "--max-new-tokens", "15", "--seed", str(seed)]
        return ok(subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                 env=checkout_env())).stdout

    first = gen(0)
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time") + 5
    assert gen(0) == first


def test_two_process_ddp_matches_one_process(tmp_path, sample_shards):
    one = tmp_path / "one"
    two = tmp_path / "two"
    ok(launch(tiny_run(one, sample_shards, "train.batch_size=8"), cwd=tmp_path))
    ok(launch(tiny_run(two, sample_shards, "train.batch_size=4"), accelerate_config="cpu_ddp.yaml", cwd=tmp_path))
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert a[6] < a[1] - 0.2  # and it learns


@pytest.mark.parametrize("grad_sync, topology, deterministic", [
    ("ddp", "DDP", False), ("coalesced", "data parallel, coalesced all-reduce", False),
    ("ddp", "DDP", True)])
def test_compiled_two_process_data_parallel_with_accumulation_matches_one_process(tmp_path, sample_shards,
                                                                                  grad_sync, topology, deterministic):
    """train.compile through the trainer's data-parallel paths (ddp: the trainer's bucket settings, dynamo under DDP,
    accumulation under no_sync; coalesced: no DDP module, the graph cut into pieces, gradients all-reduced in place
    on the last micro-step only): 2 processes x 2 micro-batches of 2 == 1 process x 8, validation losses too, and
    the start line names the topology and the compile. deterministic: the 2 processes in train.deterministic's
    mode (DDP's reducer and the split graph under torch's deterministic algorithms)."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    compiled = ("train.compile=true", "train.compile_mode=cudagraphs")  # without CUDA: one inductor graph
    out = ok(launch(tiny_run(one, sample_shards, "train.batch_size=8", *compiled), cwd=tmp_path)).stdout
    assert "(1 process, compiled (model))" in out, out[-2000:]
    # 1 MiB buckets: the model's 2.6 MB of fp32 gradients (embedding and head 1.3 MB each) go in several pieces;
    # 4 eval batches of 2 per process: the same 16 validation windows as 2 batches of 8 in one process
    out = ok(launch(tiny_run(two, sample_shards, "train.batch_size=2", "train.grad_accum_steps=2", *compiled,
                             f"train.grad_sync={grad_sync}", "train.ddp_bucket_mb=1", "train.eval_batches=4",
                             f"train.deterministic={str(deterministic).lower()}"),
                    accelerate_config="cpu_ddp.yaml", cwd=tmp_path)).stdout
    assert f"({topology}, compiled (model){', deterministic' if deterministic else ''})" in out, out[-2000:]
    if grad_sync == "coalesced":  # by the compiled pieces, more than one
        sync = re.search(r"gradient sync: (\d+) coalesced all-reduce\(s\) per step, one per compiled piece", out)
        assert sync and int(sync.group(1)) > 1, out[-2000:]
        rows = re.search(r"embedding gradient as the ([\d,]+) rows seen \(of 10,000\)", out)
        assert rows and 0 < int(rows.group(1).replace(",", "")) < 10000, out[-2000:]
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert a[6] < a[1] - 0.2
    va, vb = val_losses(one), val_losses(two)
    assert sorted(va) == sorted(vb) == [3, 6] and max(abs(va[s] - vb[s]) for s in va) < 1e-4, (va, vb)


def test_deterministic_mode_runs_the_compiled_trainer_to_the_same_losses(tmp_path, sample_shards):
    """train.deterministic through the real trainer, compiled, on the CPU: the mode's settings (torch's deterministic
    algorithms, Inductor's deterministic flag) let the compiled CPU path run, the start line says the mode is on, and
    the losses are the default mode's. On the CPU the mode changes no kernel (it is bitwise repeatable either way),
    so this checks the wiring, not the repeatability: tests/gpu/test_loss_parity_gpu.py checks that two GPU runs in
    the mode agree bit for bit."""
    plain, fixed = tmp_path / "plain", tmp_path / "fixed"
    ok(launch(tiny_run(plain, sample_shards, "train.compile=true"), cwd=tmp_path))
    out = ok(launch(tiny_run(fixed, sample_shards, "train.compile=true", "train.deterministic=true"),
                    cwd=tmp_path)).stdout
    assert "(1 process, compiled (model), deterministic)" in out, out[-2000:]
    a, b = step_losses(plain), step_losses(fixed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6, (a, b)
    assert val_losses(plain) == pytest.approx(val_losses(fixed), abs=1e-6)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, sample_shards):
    big = tmp_path / "big"
    acc = tmp_path / "acc"
    ok(launch(tiny_run(big, sample_shards, "train.batch_size=8"), cwd=tmp_path, accelerate_config=None))
    ok(launch(tiny_run(acc, sample_shards, "train.batch_size=2", "train.grad_accum_steps=4"), cwd=tmp_path,
              accelerate_config=None))
    a, b = step_losses(big), step_losses(acc)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)


def test_stop_and_resume_gives_the_same_losses(tmp_path, sample_shards):
    accum = ("train.batch_size=4", "train.grad_accum_steps=2")
    straight = tmp_path / "straight"
    ok(launch(tiny_run(straight, sample_shards, *accum), cwd=tmp_path, accelerate_config=None))
    # A run that dies after step 5, past its last checkpoint (step 3), in the middle of a metrics line.
    crashed = tmp_path / "crashed"
    ok(launch(tiny_run(crashed, sample_shards, *accum, "train.max_steps=5", "checkpoint.interval=3"), cwd=tmp_path,
              accelerate_config=None))
    shutil.rmtree(crashed / "checkpoints" / "step_0000005")  # what a crash before step 6 leaves: only step 3
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/lo')
    ok(launch(tiny_run(crashed, sample_shards, *accum, "train.resume=latest"), cwd=tmp_path,
              accelerate_config=None))
    a, b = step_losses(straight), step_losses(crashed)
    assert sorted(b) == list(range(1, 7))  # steps 4-5 redone once, not logged twice; the cut line dropped
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical on the CPU


def test_resume_refuses_what_would_change_the_run(tmp_path, sample_shards):
    run = tmp_path / "run"
    ok(launch(tiny_run(run, sample_shards, "train.max_steps=3"), cwd=tmp_path, accelerate_config=None))
    proc = launch(tiny_run(run, sample_shards, "train.resume=latest", "train.seed=7"), cwd=tmp_path,
                  accelerate_config=None)
    assert proc.returncode == 2 and "train.seed=1337" in proc.stderr and "same seed" in proc.stderr
    proc = launch(tiny_run(run, sample_shards, "train.resume=latest", "train.max_steps=3"), cwd=tmp_path,
                  accelerate_config=None)
    assert proc.returncode == 2 and "nothing to train" in proc.stderr


def test_checkpoint_from_two_processes_resumes_in_one(tmp_path, sample_shards):
    straight = tmp_path / "straight"
    ok(launch(tiny_run(straight, sample_shards), cwd=tmp_path, accelerate_config=None))
    moved = tmp_path / "moved"
    ok(launch(tiny_run(moved, sample_shards, "train.batch_size=4", "train.max_steps=3"),
              accelerate_config="cpu_ddp.yaml", cwd=tmp_path))
    ok(launch(tiny_run(moved, sample_shards, "train.resume=latest"), cwd=tmp_path, accelerate_config=None))
    a, b = step_losses(straight), step_losses(moved)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)


def test_coalesced_two_process_run_resumes_where_it_stopped(tmp_path, sample_shards):
    """train.grad_sync=coalesced keeps the trainer's checkpoints: a 2-process run stopped after its step-3
    checkpoint and resumed (weights, the prepared optimizer's state, data position) gives the uninterrupted run's
    losses; the checkpoint also resumes in 1 process with the same global batch."""
    coalesced = ("train.grad_sync=coalesced", "train.batch_size=4")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    ok(launch(tiny_run(straight, sample_shards, *coalesced), accelerate_config="cpu_ddp.yaml", cwd=tmp_path))
    ok(launch(tiny_run(stopped, sample_shards, *coalesced, "train.max_steps=3"), accelerate_config="cpu_ddp.yaml",
              cwd=tmp_path))
    one = tmp_path / "one"
    shutil.copytree(stopped, one)
    ok(launch(tiny_run(stopped, sample_shards, *coalesced, "train.resume=latest"), accelerate_config="cpu_ddp.yaml",
              cwd=tmp_path))
    ok(launch(tiny_run(one, sample_shards, "train.resume=latest"), cwd=tmp_path, accelerate_config=None))
    a, b, c = step_losses(straight), step_losses(stopped), step_losses(one)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6, (a, b)
    assert max(abs(a[s] - c[s]) for s in range(4, 7)) < 1e-4, (a, c)


def test_the_loop_logs_each_step_once_and_shows_the_start_loss(tmp_path, sample_shards):
    """What a user reads: the first step's line (the start loss, no tokens/s: its time is start-up), then a line
    every log interval, each eval and checkpoint in order; metrics.jsonl holds every step's loss once and the
    interval's other metrics on its last step's row."""
    run = tmp_path / "run"
    out = ok(launch(tiny_run(run, sample_shards, "train.max_steps=6", "train.log_interval=4"), cwd=tmp_path)).stdout
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    kinds = [(line.split("|")[0].strip(), line.split("|")[1].split()[0]) for line in lines]
    assert kinds == [("step      1/6", "loss"), ("step      3/6", "loss"), ("step      3/6", "val"),
                     ("step      3/6", "saved"), ("step      4/6", "loss"), ("step      6/6", "loss"),
                     ("step      6/6", "val"), ("step      6/6", "saved")], lines
    assert "tok/s" not in lines[0] and all("tok/s" in lines[i] for i in (1, 4, 5)), lines
    assert re.match(r"step +1/6 \| loss (\d+\.\d+) \|", lines[0])
    start = float(re.match(r"step +1/6 \| loss (\d+\.\d+) \|", lines[0]).group(1))
    assert abs(start - math.log(10000)) < 1.0  # the demo's start loss, near ln(vocab)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "train/loss" in r]
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "train/lr" in r] == [1, 3, 4, 6]
    assert [r["step"] for r in rows if "perf/tokens_per_s" in r] == [3, 4, 6]
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]
    # tokens trained on after each step: global batch 8 x seq_len 32 per step
    assert {r["step"]: r["train/tokens"] for r in rows if "train/loss" in r} == {s: 256 * s for s in range(1, 7)}

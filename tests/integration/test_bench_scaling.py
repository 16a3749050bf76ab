"""benchmarks/bench_scaling.py's CPU dry run (gloo, 2 processes through `accelerate launch`): the plans that the
GPU measurements run, checked where CI can run them — the worker measures DDP with the trainer's own settings,
and the trainer on 2 processes gives the same losses as 1 process with accumulation 2."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, checkout_env, ok

SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"


def dry_run(part: str, results: Path, *extra: str, saved_as: str | None = None) -> dict:
    ok(subprocess.run([sys.executable, str(SCRIPT), "--part", part, "--dry-run", "--results-dir", str(results),
                       *extra], capture_output=True, text=True, timeout=300, env=checkout_env()))
    return json.loads((results / f"bench_scaling_{saved_as or part}_dry_run.json").read_text())


def test_ddp_rows_measure_the_trainers_ddp_settings(tmp_path):
    from dist_lm.config import RunConfig
    from dist_lm.parallel import ddp_kwargs

    traces = tmp_path / "traces"
    rows = {r["topology"]: r for r in dry_run("dist_lm", tmp_path, "--topologies", "single,ddp", "--profile",
                                              "--trace-dir", str(traces))["rows"]}
    assert rows["single"]["tokens_per_s_per_gpu"] > 0 and rows["single"]["ddp_seen"] is None
    want = ddp_kwargs(RunConfig())
    assert rows["ddp"]["ddp_seen"] == {"bucket_cap_mb": want.bucket_cap_mb, "static_graph": False,
                                       "gradient_as_bucket_view": want.gradient_as_bucket_view,
                                       "broadcast_buffers": False,  # set by prepare_data_parallel
                                       "comm_hooks": [],
                                       # eager dry run: no compiled pieces, torch's constant left as it is
                                       "first_piece_MiB": torch.distributed._DEFAULT_FIRST_BUCKET_BYTES / 2**20}
    assert rows["ddp"]["variant"] == "" and rows["ddp"]["num_gpus"] == 2
    # --profile --trace-dir: every rank of every run leaves its Chrome trace (what benchmarks/trace_diff.py reads)
    written = sorted(p.name for p in (traces / "default").iterdir())  # one folder per --tag (none given here)
    assert len(written) == 3 and sum("_rank1." in name for name in written) == 1, written
    for path in (traces / "default").iterdir():
        events = json.loads(gzip.open(path).read())["traceEvents"]
        assert any(e.get("ph") == "X" and "aten::" in e.get("name", "") for e in events), path


def test_trainer_three_processes_equal_one_with_accumulation(tmp_path):
    """--gpus N pairs N processes with 1 process x accumulation N (3 here: the same code path as the 2-GPU
    issue's run, and the one the 4- and 8-GPU runs take)."""
    comparisons = dry_run("parity", tmp_path, "--gpus", "3")["comparisons"]
    assert [c["pair"] for c in comparisons] == ["3 GPUs DDP vs 1 GPU accum 3"]
    c = comparisons[0]
    # fp32 on gloo: the same three micro-batches, summed in another order (accumulation, then /3, vs the
    # all-reduce of three already-divided gradients), so the steps agree to fp32 rounding; a lost or repeated
    # micro-batch moves the loss by orders of magnitude more.
    assert c["steps"] == 4 and c["max_abs_diff"] < 1e-5, c
    assert c["final_1gpu"] < c["first_1gpu"]


def test_parity_noise_runs_measure_two_one_gpu_runs_of_the_same_global_batch(tmp_path):
    """--parity-noise --topologies single: only 1-GPU runs (what a one-GPU machine can run), the accumulation-N run
    again and one batch of N x B, each compared with the first: the yardstick for the N-GPU pairs' differences."""
    data = dry_run("parity", tmp_path, "--gpus", "2", "--topologies", "single", "--parity-noise",
                   saved_as="parity_noise")  # beside, not over, a plain parity part's results
    assert sorted((r["grad_accum"], r["batch_per_gpu"], str(r["noise"])) for r in data["rows"]) == [
        (1, 4, "one_batch"), (2, 2, "None"), (2, 2, "repeat")]
    comparisons = {c["pair"]: c for c in data["comparisons"]}
    assert sorted(comparisons) == ["noise: 1 GPU accum 2 again vs 1 GPU accum 2",
                                   "noise: 1 GPU one batch of 4 vs 1 GPU accum 2"]
    # fp32, eager, on the CPU: the same run again gives the same losses; one batch of 4 holds the same sequences as
    # two micro-batches of 2 (a different order of summation only), so it agrees to fp32 rounding
    again = comparisons["noise: 1 GPU accum 2 again vs 1 GPU accum 2"]
    assert again["steps"] == 4 and again["max_abs_diff"] == 0.0, again
    one_batch = comparisons["noise: 1 GPU one batch of 4 vs 1 GPU accum 2"]
    assert one_batch["steps"] == 4 and one_batch["max_abs_diff"] < 1e-5, one_batch
    assert one_batch["final_1gpu"] < one_batch["first_1gpu"]


def test_ddp_rows_without_ddp_module_use_the_coalesced_gradient_sync(tmp_path):
    """--grad-sync coalesced: the 'ddp' row runs dist_lm.parallel.grad_sync instead of a DDP module (no ddp_seen), the
    embedding's gradient as the rows of the tokens seen; --tokens sample feeds windows of the bundled sample."""
    (row,) = dry_run("dist_lm", tmp_path, "--topologies", "ddp", "--grad-sync", "coalesced")["rows"]
    assert row["ddp_seen"] is None and row["num_gpus"] == 2 and row["tokens_per_s_per_gpu"] > 0
    # eager (dry run): no compiled pieces, so the gradients go in 125 MiB groups, one for this tiny model; 2 ranks x
    # 2 x 32 uniform random ids touch nearly 128 of the 10,000 embedding rows
    sync = row["grad_sync"]
    assert {k: sync[k] for k in ("kind", "bucket_mb", "all_reduces_per_step", "by_piece")} == {
        "kind": "coalesced", "bucket_mb": 125.0, "all_reduces_per_step": 1, "by_piece": False}
    assert 100 < sync["embedding_rows"] <= 128, sync
    assert "no DDP" in row["variant"]

    sample = tmp_path / "sample"
    (row,) = dry_run("dist_lm", sample, "--topologies", "ddp", "--grad-sync", "coalesced", "--tokens", "sample",
                     "--dense-embedding")["rows"]
    assert row["grad_sync"]["embedding_rows"] is None  # the whole gradient went
    assert "whole embedding gradient" in row["variant"] and "tokens of the bundled sample" in row["variant"]
    assert (sample / "tokens" / "tinystories-sample" / "manifest.json").is_file()


def test_parity_runs_take_the_gradient_sync_of_the_ddp_rows():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_scaling

    args = bench_scaling.parse_args(["--part", "parity", "--grad-sync", "coalesced", "--dry-run"])
    runs = bench_scaling.plan_parity(args, Path("/nonexistent"))
    assert {r.topology: "train.grad_sync=coalesced" in r.script_args for r in runs} == {"single": False, "ddp": True}


def test_one_rank_group_runs_the_coalesced_sync_in_one_process():
    """scaling_step --one-rank-group: one process, no launcher, and still the whole coalesced path (its own
    process group of one rank, the all-reduce, the embedding's rows), so its cost without a peer can be measured."""
    step = ROOT / "benchmarks" / "scaling_step.py"
    proc = ok(subprocess.run([sys.executable, str(step), "--system", "dist_lm", "--dry-run", "--no-compile",
                              "--grad-sync", "coalesced", "--one-rank-group"],
                             capture_output=True, text=True, timeout=300, env=checkout_env()))
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("SCALING_ROW ")]
    row = json.loads(line.removeprefix("SCALING_ROW "))
    assert row["num_gpus"] == 1 and row["ddp_seen"] is None and row["tokens_per_s_per_gpu"] > 0
    sync = row["grad_sync"]
    assert sync["kind"] == "coalesced" and sync["all_reduces_per_step"] == 1
    assert 50 < sync["embedding_rows"] <= 64, sync  # 2 x 32 uniform random ids of 10,000, one rank's

    refused = subprocess.run([sys.executable, str(step), "--system", "dist_lm", "--dry-run", "--one-rank-group",
                              "--grad-accum", "2"], capture_output=True, text=True, timeout=300, env=checkout_env())
    assert refused.returncode == 2 and "--grad-accum 1" in refused.stderr


def test_one_rank_group_wraps_ddp_as_prepare_would_on_several_processes():
    """scaling_step --one-rank-group with DDP: Accelerate wraps no DDP module around one process, so the benchmark
    wraps it with the trainer's settings, and the row shows that DDP got them."""
    from dist_lm.config import RunConfig
    from dist_lm.parallel import ddp_kwargs

    step = ROOT / "benchmarks" / "scaling_step.py"
    proc = ok(subprocess.run([sys.executable, str(step), "--system", "dist_lm", "--dry-run", "--no-compile",
                              "--one-rank-group"],
                             capture_output=True, text=True, timeout=300, env=checkout_env()))
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("SCALING_ROW ")]
    row = json.loads(line.removeprefix("SCALING_ROW "))
    assert row["num_gpus"] == 1 and "grad_sync" not in row and row["tokens_per_s_per_gpu"] > 0
    ddp = ddp_kwargs(RunConfig())
    assert row["ddp_seen"] == {**row["ddp_seen"], "bucket_cap_mb": ddp.bucket_cap_mb, "gradient_as_bucket_view": True,
                               "broadcast_buffers": False, "comm_hooks": []}, row["ddp_seen"]


def test_save_writes_the_table_as_a_results_file(tmp_path):
    """--save: what the table shows, as a benchmarks/results/ file that benchmarks/render.py renders, with the
    command that ran (without the --save)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import render

    saved = tmp_path / "scaling.json"
    dry_run("dist_lm", tmp_path, "--topologies", "single,ddp", "--save", str(saved))
    data = json.loads(saved.read_text())
    render.check_results(data, str(saved))
    (row,) = data["tables"]["scaling"]
    assert row["system"] == "dist_lm DDP" and row["num_gpus"] == 2 and row["efficiency"] > 0, row
    assert data["commands"] == [f"python benchmarks/bench_scaling.py --part dist_lm --dry-run --results-dir {tmp_path} "
                                "--topologies single,ddp"]
    assert "| dry-run | dist_lm DDP | eager | 2 |" in render.render_block(data)

"""The trainer on two (or all) GPUs through `accelerate launch`: FSDP2 with compile, checkpoints that move between
GPU counts.

Accelerate runs no FSDP on the CPU, so this is the only place the trainer's FSDP2 path (configs/accelerate/
fsdp.yaml) runs for real; tests/integration/test_fsdp.py checks the same sharding functions over gloo.

Tolerance: the runs are bf16 + torch.compile; a resumed run recomputes the same steps from the same weights,
optimizer state, data position and RNG, so its losses differ from the uninterrupted run's only by reduction
order (1 GPU x accumulation 2 vs 2 GPUs): 0.05 absolute on losses of ~4-9 covers that, and a resume that lost
the optimizer state or the data position misses it by far (the loss jumps by >0.3 at the first resumed steps).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
TOKENIZER = ROOT / "tokenizers" / "tinystories-10k"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TOLERANCE = 0.05

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from dist_lm.data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "tinystories-sample"
    prepare_shards("bundled:tinystories", TOKENIZER, out, log=lambda *_: None)
    return out


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}


def train(run_dir: Path, shards: Path, accelerate_config: str, *extra: str, processes: int | None = None) -> str:
    """One `accelerate launch launch/train.py` of the demo model (bf16, compiled); returns its output.
    `processes` overrides the config's num_processes (2 in the shipped multi-GPU configs)."""
    overrides = [f"run_dir={run_dir}", f"name={run_dir.name}", f"data.data_dir={shards}",
                 f"data.tokenizer_dir={TOKENIZER}", "train.batch_size=16", "train.max_steps=30",
                 "optim.warmup_steps=5", "optim.cosine_steps=30", "train.log_interval=5", "train.eval_interval=15",
                 "train.eval_batches=2", "train.sample_tokens=0", "checkpoint.interval=15", "checkpoint.keep_last=0",
                 "tracking.enabled=false", "train.mixed_precision=bf16", "train.compile=true", *extra]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
           str(ACCELERATE_CONFIGS / accelerate_config),
           *(["--num_processes", str(processes)] if processes else []), str(ROOT / "launch" / "train.py"),
           "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def grad_norms(run_dir: Path) -> dict[int, float]:
    """The gradient norm (before clipping) logged at each log step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/grad_norm"] for r in rows if "train/grad_norm" in r}


def resumable_copy(run_dir: Path, dest: Path) -> Path:
    """The run as a crash after step 15 leaves it: the step-30 checkpoint gone (metrics get truncated)."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / "step_0000030")
    return dest


def test_fsdp2_checkpoint_resumes_on_one_and_two_gpus_and_generates(tmp_path, shards):
    straight = tmp_path / "fsdp2"
    out = train(straight, shards, "fsdp.yaml")
    assert "(FSDP2, model units, compiled (model))" in out and "2 process(es)" in out, out[-2000:]
    ref = losses(straight)
    assert sorted(ref) == list(range(1, 31)) and ref[30] < ref[1] - 2.0  # it learns (ln 10000 = 9.2 at step 1)

    # The checkpoint is consolidated: full (unsharded) tensors under the model's own parameter names.
    from safetensors.torch import load_file

    from dist_lm.config import load_config
    from dist_lm.model import TransformerLM

    saved = load_file(straight / "checkpoints" / "step_0000030" / "model.safetensors")
    model = TransformerLM(load_config(straight / "config.yaml").model)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # Resume from step 15 on one GPU (accumulation 2 keeps the global batch) and on two GPUs (FSDP2 again, with
    # each block its own unit: the consolidated checkpoint does not depend on how it was sharded).
    one = resumable_copy(straight, tmp_path / "resumed_1gpu")
    out = train(one, shards, "single.yaml", "train.resume=latest", "train.batch_size=16", "train.grad_accum_steps=2")
    assert "resuming at step 15" in out
    two = resumable_copy(straight, tmp_path / "resumed_2gpu")
    out = train(two, shards, "fsdp.yaml", "train.resume=latest", "train.fsdp_unit=block")
    assert "resuming at step 15" in out and "(FSDP2, block units, compiled (blocks))" in out
    for resumed in (one, two):
        got = losses(resumed)
        assert sorted(got) == list(range(1, 31))
        worst = max(abs(got[s] - ref[s]) for s in range(16, 31))
        assert worst < TOLERANCE, (resumed.name, worst, {s: (ref[s], got[s]) for s in range(16, 31)})

    # The 2-GPU checkpoint generates on one GPU and on the CPU; seeded, so the same call gives the same text.
    def generate(device: str) -> str:
        cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), "--checkpoint", str(straight), "--prompt",
               "Once upon a time", "--max-new-tokens", "30", "--seed", "3", "--device", device]
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    for device in ("cuda", "cpu"):
        text = generate(device)
        assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 20, text
        assert generate(device) == text


@pytest.mark.parametrize("grad_sync", ["ddp", "coalesced"])
def test_data_parallel_compiled_two_gpus_equal_one_gpu_with_accumulation(tmp_path, shards, grad_sync):
    """The trainer's compiled data-parallel paths on 2 GPUs against 1 GPU x accumulation 2 at the same global batch:
    the same micro-batches, so the same curve up to the rounding of two different reductions (eager: identical at
    every step, benchmarks/README.md). ddp: the default (CUDA graphs, 125 MiB buckets, gradients as bucket views,
    DDP's own averaging, graph pieces aligned with the buckets); coalesced: no DDP module, the CUDA-graph pieces'
    gradients all-reduced in place from the backward hooks, the embedding's as the rows seen (1 MiB pieces here, so
    that the 3.4M-parameter demo model is cut into several)."""
    two = tmp_path / grad_sync
    extra = ("train.grad_sync=coalesced", "train.ddp_bucket_mb=1") if grad_sync == "coalesced" else ()
    out = train(two, shards, "ddp.yaml", *extra)
    topology = "DDP" if grad_sync == "ddp" else "data parallel, coalesced all-reduce"
    assert f"({topology}, compiled (cudagraphs))" in out and "2 process(es)" in out, out[-2000:]
    if grad_sync == "coalesced":
        assert "one per compiled piece; embedding gradient as the" in out, out[-2000:]
    one = tmp_path / "single_accum2"
    out = train(one, shards, "single.yaml", "train.grad_accum_steps=2")
    assert "(1 process, compiled (cudagraphs))" in out, out[-2000:]
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    diffs = [abs(a[s] - b[s]) for s in range(1, 31)]
    print("\nDDP 2 GPUs vs 1 GPU x accumulation 2, |loss difference| per step: "
          + " ".join(f"{d:.1e}" for d in diffs))
    # Provisional bounds, not yet run: bench_scaling's compiled parity run (another schedule: 50 steps, 2x H200,
    # 2026-11-26) parted by up to 0.068 at step 23, mean 0.026 (eager: 0 at every step). Two 1-GPU runs of one
    # compiled command differ by 2e-6 - 6e-5 over steps 1-12 (autotuned kernels; one H100, 2026-12-06), so the early
    # bound leaves room for NCCL's other order of summation; a lost or doubled micro-batch moves step 2 by far more.
    assert max(diffs[:3]) < 5e-3 and max(diffs) < 0.25 and sum(diffs) / len(diffs) < 0.05, diffs
    assert a[30] < a[1] - 2.0
    # The mean over ranks, not the sum: Adam and clipping hide a constant gradient scale from the losses of the
    # first steps, not from the logged norm (a sum would double it).
    norms_two, norms_one = grad_norms(two), grad_norms(one)
    assert all(abs(norms_two[s] / norms_one[s] - 1) < 0.1 for s in (5, 10)), (norms_two, norms_one)


@pytest.mark.parametrize("accelerate_config", ["ddp.yaml", "fsdp.yaml"])
def test_deterministic_mode_repeats_a_two_gpu_run_bit_for_bit(tmp_path, shards, accelerate_config):
    """train.deterministic on 2 GPUs (DDP; FSDP2): the same command twice, the same loss at every step bit for bit
    (the all-reduces and reduce-scatters keep their order for the same sizes and ranks; the rest is the 1-GPU
    mode, tests/gpu/test_loss_parity_gpu.py)."""
    runs = [tmp_path / f"run{i}" for i in (1, 2)]
    for run_dir in runs:
        out = train(run_dir, shards, accelerate_config, "train.deterministic=true")
        assert "deterministic)" in out and "2 process(es)" in out, out[-2000:]
    first, again = (losses(r) for r in runs)
    assert sorted(first) == sorted(again) == list(range(1, 31))
    differ = {s: (first[s], again[s]) for s in first if first[s] != again[s]}
    assert not differ, differ


@pytest.mark.skipif(torch.cuda.device_count() < 4 or torch.cuda.device_count() % 2,
                    reason="needs an even number of CUDA GPUs, at least 4 (the 2-GPU resume is the test above)")
def test_fsdp2_checkpoint_from_all_gpus_resumes_on_two(tmp_path, shards):
    """Issue "Four and eight GPUs": a run saved by FSDP2 on every GPU of the host (N) resumes on 2 GPUs with
    accumulation N/2 (the same global batch) and follows the uninterrupted N-GPU run within TOLERANCE."""
    n = torch.cuda.device_count()
    straight = tmp_path / f"fsdp2_x{n}"
    out = train(straight, shards, "fsdp.yaml", processes=n)
    assert f"{n} process(es)" in out, out[-2000:]
    ref = losses(straight)
    assert sorted(ref) == list(range(1, 31)) and ref[30] < ref[1] - 2.0
    two = resumable_copy(straight, tmp_path / "resumed_2gpu")
    out = train(two, shards, "fsdp.yaml", "train.resume=latest", f"train.grad_accum_steps={n // 2}")
    assert "resuming at step 15" in out and "2 process(es)" in out, out[-2000:]
    got = losses(two)
    assert sorted(got) == list(range(1, 31))
    worst = max(abs(got[s] - ref[s]) for s in range(16, 31))
    print(f"\nFSDP2 saved on {n} GPUs, resumed on 2 x accumulation {n // 2}: max |loss difference| {worst:.2e}")
    assert worst < TOLERANCE, {s: (ref[s], got[s]) for s in range(16, 31)}

"""Collective bandwidth between the GPUs of one host: what the data-parallel step has to hide.

usage: python benchmarks/bench_comm.py [--sizes-mb 25,134,536] [--gpus N] [--overlap] [--save PATH] (2+ CUDA GPUs)
       python benchmarks/bench_comm.py --dry-run [--overlap]                      (CPU, gloo, to check the script)

Prints, per collective (all-reduce, all-gather, reduce-scatter) and message size, the time and the bus bandwidth
in nccl-tests' convention (all-reduce: bytes * 2(n-1)/n / t; all-gather and reduce-scatter: bytes * (n-1)/n / t,
bytes being the whole tensor), and which transport NCCL chose between the GPUs (P2P over NVLink, SHM through
host memory, ...), read from NCCL_DEBUG=INFO. The default sizes are a DDP bucket (25 MB), and the 124M shape's
gradients in bf16 and in fp32 (~268 / 536 MB).

--overlap adds what an all-reduce costs the compute it overlaps: a chain of matmuls of the 124M block's MLP
shapes (16 x 1024 tokens, d 768 -> 2048 -> 768, bf16) timed alone and beside one fp32 all-reduce of
--overlap-mb (a DDP bucket), for NCCL communicators of fewer or more CTAs (thread blocks, one SM each), a
high-priority NCCL stream, and cuBLAS told to leave SMs free (torch's SM carveout, which torch applies on its
cuBLASLt path only: those rows send the matmuls through cuBLASLt, beside a cuBLASLt row without carveout). The
chain's slowdown, as a share of the all-reduce's own time, is the part of an overlapped all-reduce that overlap
does not hide.

`--save PATH` writes the results file (benchmarks/render.py's format). A new run updates the README: on the device
`--save $OUT/comm.json`, copy it over benchmarks/results/comm.json, then `python benchmarks/render.py`.

Design decisions:
- One process per GPU through torch.multiprocessing (spawn), NCCL; NVLink multicast forced off (KINDS.md) in the
  environment the children inherit, before CUDA or NCCL load.
- 5 warm-up then 20 timed collectives per point, timed with CUDA events around the batch (no host sync inside).
"""

from __future__ import annotations

import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WARMUP, TIMED = 5, 20
# --overlap: (label, NCCL communicator options, cuBLAS SM carveout); None: the default communicator / no carveout
OVERLAP_SETTINGS = (("default", None, None), ("NCCL max 8 CTAs", {"max_ctas": 8}, None),
                    ("NCCL max 16 CTAs", {"max_ctas": 16}, None), ("NCCL min 32 CTAs", {"min_ctas": 32}, None),
                    ("NCCL high-priority stream", {"high_priority": True}, None),
                    ("cuBLASLt, no carveout", None, 0), ("cuBLASLt, SM carveout 16", None, 16),
                    ("cuBLASLt, SM carveout 32", None, 32))


def _worker(rank: int, world: int, sizes_mb: list[float], port: int, result_file: str, cpu: bool,
            overlap_mb: float | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world,
                            **({} if cpu else {"device_id": device}))
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for mb in sizes_mb:
            numel = max(world, int(mb * 2**20 / torch.finfo(dtype).bits * 8) // world * world)
            full = torch.randn(numel, device=device).to(dtype)
            part = torch.empty(numel // world, device=device, dtype=dtype)
            ops = {  # (op, bus-bandwidth factor); default args bind this iteration's tensors
                "all_reduce": (lambda f=full: dist.all_reduce(f), 2 * (world - 1) / world),
                "all_gather": (lambda f=full, q=part: dist.all_gather_into_tensor(f, q), (world - 1) / world),
                "reduce_scatter": (lambda f=full, q=part: dist.reduce_scatter_tensor(q, f), (world - 1) / world),
            }
            for name, (op, factor) in ops.items():
                for _ in range(WARMUP):
                    op()
                seconds = _time(op, device)
                nbytes = full.numel() * full.element_size()
                rows.append((name, str(dtype).removeprefix("torch."), nbytes, seconds, nbytes * factor / seconds))
    if rank == 0:
        Path(result_file).write_text("\n".join(",".join(map(str, r)) for r in rows))
    if overlap_mb is not None:
        overlap = _overlap_rows(world, device, overlap_mb)
        if rank == 0:
            Path(result_file + ".overlap").write_text(json.dumps(overlap))
    dist.barrier()
    dist.destroy_process_group()


def _communicator(options: dict | None, world: int):
    """A new NCCL communicator with the given CTA limits / stream priority (None: the default group)."""
    if options is None:
        return None
    nccl_options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=options.get("high_priority", False))
    for key in ("min_ctas", "max_ctas"):
        if key in options:
            setattr(nccl_options.config, key, options[key])
    return dist.new_group(list(range(world)), backend="nccl", pg_options=nccl_options)


def _overlap_rows(world: int, device: torch.device, overlap_mb: float) -> list[dict]:
    """Per OVERLAP_SETTINGS entry: all-reduce alone, matmul chain alone, the chain beside the all-reduce (ms)."""
    cpu = device.type == "cpu"
    tokens, d_model, d_ff = (64, 32, 64) if cpu else (16 * 1024, 768, 2048)
    dtype = torch.float32 if cpu else torch.bfloat16
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    w_in = torch.randn(d_ff, d_model, device=device, dtype=dtype) * 0.02
    w_out = torch.randn(d_model, d_ff, device=device, dtype=dtype) * 0.02
    bucket = torch.randn(int(overlap_mb * 2**20) // 4, device=device)

    def chain() -> None:
        h = x
        for _ in range(12):
            h = (h @ w_in.t()) @ w_out.t()

    # The mean, as DDP's buckets take it (and the bucket stays finite over the repeats); gloo has no AVG.
    op = dist.ReduceOp.SUM if cpu else dist.ReduceOp.AVG

    def all_reduce(group, async_op: bool = False):
        return dist.all_reduce(bucket, op=op, group=group, async_op=async_op)

    rows = []
    settings = OVERLAP_SETTINGS[:1] if cpu else OVERLAP_SETTINGS  # gloo has no CTAs and the CPU no cuBLAS
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):  # an experimental hook, not in every torch
        settings = [s for s in settings if s[2] is None]
    for label, options, carveout in settings:
        group = _communicator(options, world)
        if carveout is not None:
            # torch applies the carveout (cuBLASLt's SM-count target) on its cuBLASLt path only: send the
            # matmuls there for these rows; the row's "chain alone" shows what the SMs left out cost.
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(carveout)
        for _ in range(WARMUP):
            all_reduce(group)
            chain()
        reduce_s, chain_s = _time(lambda g=group: all_reduce(g), device), _time(chain, device)
        beside = []
        for _ in range(TIMED // 4):
            dist.barrier()  # both ranks start the all-reduce together, as the ranks of a DDP step roughly do
            beside.append(_time_beside(lambda g=group: all_reduce(g, async_op=True), chain, device))
        if carveout is not None:
            torch._C._set_sm_carveout_experimental(None)
            torch.backends.cuda.preferred_blas_library("default")
        rows.append({"setting": label, "all_reduce_ms": reduce_s * 1e3, "chain_ms": chain_s * 1e3,
                     "chain_beside_ms": sorted(beside)[len(beside) // 2] * 1e3})
    return rows


def _time_beside(start_async, chain, device: torch.device) -> float:
    """Seconds the chain takes when an asynchronous collective (start_async() -> work) starts just before it."""
    if device.type == "cpu":
        t0 = time.perf_counter()
        work = start_async()
        chain()
        seconds = time.perf_counter() - t0
        work.wait()
        return seconds
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    work = start_async()  # on NCCL's stream, after the compute stream's pending work (none)
    chain()
    end.record()
    work.wait()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def _time(op, device: torch.device) -> float:
    if device.type == "cpu":
        t0 = time.perf_counter()
        for _ in range(TIMED):
            op()
        return (time.perf_counter() - t0) / TIMED
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(TIMED):
        op()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / TIMED


def _transports(log: str) -> list[str]:
    """NCCL's channel lines say how rank i reaches rank j, e.g. 'via P2P/CUMEM/read' or 'via SHM/direct/direct'."""
    found = sorted({m.group(1) for m in re.finditer(r" via (\S+)", log)})
    return found or ["(not reported)"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="25,134,268,536", help="comma list of message sizes in MiB")
    p.add_argument("--gpus", type=int, default=0, help="processes (0: every visible GPU)")
    p.add_argument("--port", type=int, default=29580)
    p.add_argument("--dry-run", action="store_true", help="2 CPU processes over gloo, 1 MiB")
    p.add_argument("--overlap", action="store_true",
                   help="also time a matmul chain beside an all-reduce, per NCCL/cuBLAS setting (module docstring)")
    p.add_argument("--overlap-mb", type=float, default=128.0, help="--overlap: the all-reduce's size in MiB")
    p.add_argument("--save", type=Path, default=None, help="also write the results file here")
    args = p.parse_args(argv)
    sizes = [1.0] if args.dry_run else [float(s) for s in args.sizes_mb.split(",") if s]
    world = 2 if args.dry_run else (args.gpus or torch.cuda.device_count())
    if not args.dry_run and (world < 2 or world > torch.cuda.device_count()):
        raise SystemExit(f"bench_comm needs 2+ CUDA GPUs (asked {world}, found {torch.cuda.device_count()}); "
                         "--dry-run checks it on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "rows.csv", Path(tmp) / "nccl.log"
        # NCCL writes its INFO lines to the file named here; read back for the transport between the GPUs.
        # One file per process (%h host, %p pid): ranks writing one file would interleave their lines.
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,P2P,SHM,NET",
                          NCCL_DEBUG_FILE=str(log) + ".%h.%p")
        overlap_mb = (1.0 if args.dry_run else args.overlap_mb) if args.overlap else None
        mp.spawn(_worker, args=(world, sizes, args.port, str(result), args.dry_run, overlap_mb), nprocs=world,
                 join=True)
        overlap = json.loads(Path(str(result) + ".overlap").read_text()) if args.overlap else []
        rows = [line.split(",") for line in result.read_text().splitlines()]
        logs = "".join(f.read_text(errors="replace") for f in Path(tmp).glob("nccl.log*"))
    device = "cpu (gloo)" if args.dry_run else f"{torch.cuda.get_device_name(0)} x{world}"
    print(f"bench_comm: {device} | torch {torch.__version__} | NCCL {_nccl_version()} | transport: "
          f"{', '.join(_transports(logs)) if not args.dry_run else 'gloo'}")
    print("\n| collective | dtype | MiB | ms | bus GB/s |\n|---|---|---|---|---|")
    for name, dtype, nbytes, seconds, busbw in rows:
        print(f"| {name} | {dtype} | {int(nbytes) / 2**20:,.0f} | {float(seconds) * 1e3:.2f} | "
              f"{float(busbw) / 1e9:,.1f} |")
    if overlap:
        print(f"\nA matmul chain beside one fp32 all-reduce of {overlap_mb:g} MiB (slowdown: chain beside minus "
              "alone; share: of the all-reduce's own time)")
        print("\n| setting | all-reduce ms | chain alone ms | chain beside ms | slowdown ms | share |\n"
              "|---|---|---|---|---|---|")
        for r in overlap:
            slowdown = r["chain_beside_ms"] - r["chain_ms"]
            print(f"| {r['setting']} | {r['all_reduce_ms']:.3f} | {r['chain_ms']:.3f} | {r['chain_beside_ms']:.3f} | "
                  f"{slowdown:+.3f} | {slowdown / r['all_reduce_ms']:.0%} |")
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from render import command_line, write_results

        tables, notes = {"comm": results_rows(rows)}, ["Bus bandwidth in nccl-tests' convention."]
        if overlap:
            tables["comm_overlap"] = overlap_rows(overlap)
            notes.append(f"Overlap: a matmul chain beside one fp32 all-reduce of {overlap_mb:g} MiB.")
        write_results(args.save, title="Collectives between GPUs of one host",
                      hardware={"cpu": "2 CPU processes (gloo)"} if args.dry_run else
                      {"gpu": torch.cuda.get_device_name(0), "gpu_count": world,
                       "note": "transport " + ", ".join(_transports(logs))},
                      versions={"torch": torch.__version__, "NCCL": _nccl_version()},
                      commands=[command_line("benchmarks/bench_comm.py")], tables=tables, notes=notes)
        print(f"wrote {args.save}")
    sys.stdout.flush()


def results_rows(rows: list[list[str]]) -> list[dict]:
    """The workers' (collective, dtype, bytes, seconds, bus bytes/s) rows -> the results file's "comm" rows."""
    return [{"collective": name, "dtype": dtype, "mib": int(nbytes) / 2**20, "ms": float(seconds) * 1e3,
             "busbw_gbs": float(busbw) / 1e9} for name, dtype, nbytes, seconds, busbw in rows]


def overlap_rows(overlap: list[dict]) -> list[dict]:
    """--overlap's rows -> the results file's "comm_overlap" rows (the slowdown and its share of the all-reduce)."""
    return [{**r, "slowdown_ms": r["chain_beside_ms"] - r["chain_ms"],
             "share": (r["chain_beside_ms"] - r["chain_ms"]) / r["all_reduce_ms"]} for r in overlap]


def _nccl_version() -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # CPU-only builds have no NCCL
        return "-"


if __name__ == "__main__":
    main()

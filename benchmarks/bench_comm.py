"""Collective bandwidth between the GPUs of one host: what the data-parallel step has to hide.

usage: python benchmarks/bench_comm.py [--sizes-mb 25,134,536] [--gpus N]      (2+ CUDA GPUs)
       python benchmarks/bench_comm.py --dry-run                                (CPU, gloo, to check the script)

Prints, per collective (all-reduce, all-gather, reduce-scatter) and message size, the time and the bus bandwidth
in nccl-tests' convention (all-reduce: bytes * 2(n-1)/n / t; all-gather and reduce-scatter: bytes * (n-1)/n / t,
bytes being the whole tensor), and which transport NCCL chose between the GPUs (P2P over NVLink, SHM through
host memory, ...), read from NCCL_DEBUG=INFO. The default sizes are a DDP bucket (25 MB), and the 124M shape's
gradients in bf16 and in fp32 (~268 / 536 MB).

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
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WARMUP, TIMED = 5, 20


def _worker(rank: int, world: int, sizes_mb: list[float], port: int, result_file: str, cpu: bool) -> None:
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
    dist.barrier()
    dist.destroy_process_group()


def _time(op, device: torch.device) -> float:
    if device.type == "cpu":
        import time

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
        mp.spawn(_worker, args=(world, sizes, args.port, str(result), args.dry_run), nprocs=world, join=True)
        rows = [line.split(",") for line in result.read_text().splitlines()]
        logs = "".join(f.read_text(errors="replace") for f in Path(tmp).glob("nccl.log*"))
    device = "cpu (gloo)" if args.dry_run else f"{torch.cuda.get_device_name(0)} x{world}"
    print(f"bench_comm: {device} | torch {torch.__version__} | NCCL {_nccl_version()} | transport: "
          f"{', '.join(_transports(logs)) if not args.dry_run else 'gloo'}")
    print("\n| collective | dtype | MiB | ms | bus GB/s |\n|---|---|---|---|---|")
    for name, dtype, nbytes, seconds, busbw in rows:
        print(f"| {name} | {dtype} | {int(nbytes) / 2**20:,.0f} | {float(seconds) * 1e3:.2f} | "
              f"{float(busbw) / 1e9:,.1f} |")
    sys.stdout.flush()


def _nccl_version() -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # CPU-only builds have no NCCL
        return "-"


if __name__ == "__main__":
    main()

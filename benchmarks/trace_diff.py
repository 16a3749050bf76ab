"""Where the extra time of a data-parallel step goes: two Chrome traces of the same step, kernel by kernel.

usage: python benchmarks/trace_diff.py BASE.json.gz OTHER.json.gz [--steps 3] [--top 15]

BASE is typically the 1-GPU run and OTHER one rank of the DDP run, both written by
`bench_scaling.py --profile --trace-dir DIR` (the same number of profiled steps each). Prints, per step:
- each GPU stream's kernel count, busy time and gaps (the compute stream's gaps include waiting for the last
  all-reduce);
- kernel time by kind (GEMMs, NCCL, attention, copies, memsets, each inductor kernel family, ...), the largest
  differences first;
- the GEMMs that ran while an NCCL kernel was running, against the same GEMMs (matched by order in the middle
  step) of BASE: how much slower a matmul gets beside an all-reduce, apart from the rest.

Design decisions:
- Kinds, not kernel names: inductor numbers its kernels per graph (`triton_poi_fused_..._7`), and DDP's graph
  pieces renumber them, so names differ between the runs while the work is the same; the numeric suffix is
  dropped and GEMMs (cuBLAS's nvjet/cutlass kernels) are one kind.
- Only GPU activity (kernels, memcpy, memset events) is read; host events are in the trace for a viewer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_gpu_events(path: Path) -> list[dict]:
    """The trace's GPU activities (name, ts and dur in microseconds, args.stream), sorted by start."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit(f"{path}: no GPU kernels in this trace (profiled on the CPU?)")
    return gpu


def kind(name: str) -> str:
    """The kind of work a kernel does, stable across graph splits (see the module docstring)."""
    if name.startswith("nccl"):
        return "NCCL"
    # Only the kernel's own name, not its template arguments: attention kernels carry cutlass:: types in theirs.
    base = name.split("<")[0].split("(")[0]
    if "nvjet" in base or "gemm" in base.lower() or "cutlass" in base.lower():
        return "GEMM"
    if name.startswith(("Memcpy", "Memset")):
        return name.split(" (")[0]
    if name.startswith("triton"):
        return re.sub(r"_\d+$", "", name)[:80]
    return name.split("<")[0][:80]


def coarse_kind(name: str) -> str:
    """kind() with all of inductor's generated kernels as one (their split differs with the graph pieces)."""
    k = kind(name)
    if k.startswith("triton_"):
        return "inductor (Triton) kernels"
    if k.startswith("_attn"):
        return "attention (dist_lm Triton)"
    return k


def is_gemm(event: dict) -> bool:
    return kind(event["name"]) == "GEMM"


def stream_summary(events: list[dict], steps: int) -> dict[int, dict[str, float]]:
    """Per stream: kernels, busy ms and gap ms, per step. Gaps are the stream's idle time between its first and
    last kernel, the time between the profiled steps included (steps run back to back, so that is idle too)."""
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_stream[e.get("args", {}).get("stream", -1)].append(e)
    out = {}
    for stream, es in by_stream.items():
        gaps = sum(max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(es, es[1:]))
        out[stream] = {"kernels": len(es) / steps, "busy_ms": sum(e["dur"] for e in es) / steps / 1e3,
                       "gaps_ms": gaps / steps / 1e3}
    return out


def time_by_kind(events: list[dict], steps: int, classify=kind) -> Counter:
    """ms per step of each kind (`classify`: kind or coarse_kind)."""
    totals: Counter = Counter()
    for e in events:
        totals[classify(e["name"])] += e["dur"] / steps / 1e3
    return totals


def _print_table(a: Counter, b: Counter, top: int) -> None:
    print("| kind | base ms | other ms | difference |\n|---|---|---|---|")
    for k in sorted(set(a) | set(b), key=lambda k: -abs(b[k] - a[k]))[:top]:
        print(f"| {k} | {a[k]:.3f} | {b[k]:.3f} | {b[k] - a[k]:+.3f} |")


def _overlaps(event: dict, intervals: list[tuple[float, float]]) -> bool:
    start, end = event["ts"], event["ts"] + event["dur"]
    return any(a < end and start < b for a, b in intervals)


def gemms_beside_nccl(base: list[dict], other: list[dict], steps: int) -> dict[str, float]:
    """The middle step's GEMMs of `other`, split by whether an NCCL kernel ran beside them, each against the same
    GEMM (by order) of `base`: ms in base and in other, per group."""
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in other if kind(e["name"]) == "NCCL"]
    base_gemms, other_gemms = [e for e in base if is_gemm(e)], [e for e in other if is_gemm(e)]
    if not base_gemms:
        raise SystemExit("no GEMMs in the base trace: nothing to match")
    if len(other_gemms) != len(base_gemms) or len(base_gemms) % steps:
        raise SystemExit(f"the traces differ in GEMM count ({len(base_gemms)} vs {len(other_gemms)}), or it is not "
                         f"a multiple of --steps {steps}: not the same step, or not the same number of steps")
    per_step = len(base_gemms) // steps
    middle = slice((steps // 2) * per_step, (steps // 2 + 1) * per_step)
    out = {"beside_base_ms": 0.0, "beside_ms": 0.0, "alone_base_ms": 0.0, "alone_ms": 0.0, "beside_count": 0}
    for a, b in zip(base_gemms[middle], other_gemms[middle]):
        group = "beside" if _overlaps(b, nccl) else "alone"
        out[f"{group}_base_ms"] += a["dur"] / 1e3
        out[f"{group}_ms"] += b["dur"] / 1e3
        out["beside_count"] += group == "beside"
    return out


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%" if old else "-"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path, help="trace of the reference run (e.g. 1 GPU)")
    p.add_argument("other", type=Path, help="trace of the run to explain (e.g. one DDP rank)")
    p.add_argument("--steps", type=int, default=3, help="steps in each trace (bench_scaling profiles 3)")
    p.add_argument("--top", type=int, default=15, help="kinds to list, largest difference first")
    args = p.parse_args(argv)
    base, other = load_gpu_events(args.base), load_gpu_events(args.other)
    for label, path, events in (("base", args.base, base), ("other", args.other, other)):
        span = (max(e["ts"] + e["dur"] for e in events) - events[0]["ts"]) / args.steps / 1e3
        print(f"{label}: {path.name}, span {span:.2f} ms per step")
        for stream, s in sorted(stream_summary(events, args.steps).items(), key=lambda kv: -kv[1]["busy_ms"]):
            print(f"  stream {stream}: {s['kernels']:.0f} kernels, busy {s['busy_ms']:.2f} ms, "
                  f"gaps {s['gaps_ms']:.2f} ms")
    a, b = time_by_kind(base, args.steps), time_by_kind(other, args.steps)
    print(f"\nkernel time per step: base {sum(a.values()):.2f} ms, other {sum(b.values()):.2f} ms\n")
    _print_table(time_by_kind(base, args.steps, coarse_kind), time_by_kind(other, args.steps, coarse_kind), args.top)
    print("\nkernel by kernel kind:\n")
    _print_table(a, b, args.top)
    g = gemms_beside_nccl(base, other, args.steps)
    print(f"\nGEMMs of the middle step: {g['beside_count']} ran beside an NCCL kernel, "
          f"{g['beside_base_ms']:.2f} -> {g['beside_ms']:.2f} ms ({_pct(g['beside_ms'], g['beside_base_ms'])}); "
          f"the others {g['alone_base_ms']:.2f} -> {g['alone_ms']:.2f} ms ({_pct(g['alone_ms'], g['alone_base_ms'])})")


if __name__ == "__main__":
    main()

"""Where a benchmark step's GPU time goes (benchmarks/scaling_step.py --profile): kernels from torch.profiler sorted
into compute, NCCL and copies, and what of the communication no compute overlaps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted, merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def profile_summary(step: Callable[[], torch.Tensor], device: torch.device, steps: int = 3,
                    trace: Path | None = None) -> dict:
    """Where a step's GPU time goes, per step in ms: the span from the first kernel to the last, the time any
    compute kernel runs, the time NCCL kernels run, the part of that with no compute beside it (exposed
    communication: what overlap would remove), idle gaps, and the top kernels by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync_device(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))  # a .json.gz name is written compressed
    # GPU-side user annotations (DDP's "DistributedDataParallel.forward", "nccl:all_reduce") are ranges, not
    # kernels: counted as busy they would fill the gaps between the kernels they span.
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if not kernels:
        return {"error": "no GPU kernels recorded"}
    is_comm = [("nccl" in name.lower()) for name, _, _ in kernels]
    # Copies and memsets run on the copy engines, beside the SMs: busy time, but not compute.
    is_copy = [name.lower().startswith(("memcpy", "memset")) for name, _, _ in kernels]
    comm = _union([(a, b) for (_, a, b), c in zip(kernels, is_comm) if c])
    compute = _union([(a, b) for (_, a, b), c, m in zip(kernels, is_comm, is_copy) if not (c or m)])
    span = max(b for _, _, b in kernels) - min(a for _, a, _ in kernels)
    busy = _length(_union([(a, b) for _, a, b in kernels]))
    totals: dict[str, float] = {}
    for name, a, b in kernels:
        totals[name[:70]] = totals.get(name[:70], 0.0) + (b - a)
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    per = 1e3 * steps  # microseconds over `steps` steps -> ms per step
    # Host side: the ops with the most self CPU time (where a GPU left idle waits for the host).
    host = sorted(((e.key[:60], e.self_cpu_time_total) for e in prof.key_averages()), key=lambda kv: -kv[1])[:8]
    # The last step's collectives, each as (start, end) in ms before the profile's last kernel (the last step's
    # optimizer) and its exposed part: which all-reduce (bucket) is the tail the step waits for.
    end = max(b for _, _, b in kernels)
    per_step = max(1, round(sum(is_comm) / steps))  # not whole when other collectives run (FSDP's clip)
    last = sorted((a, b) for (_, a, b), c in zip(kernels, is_comm) if c)[-per_step:] if any(is_comm) else []
    timeline = [[(end - a) / 1e3, (end - b) / 1e3, (b - a - _overlap([(a, b)], compute)) / 1e3] for a, b in last]
    return {"nccl_last_step_ms_before_end": timeline, "host_top_ms": [[name, t / per] for name, t in host],
            "steps": steps, "span_ms": span / per, "compute_ms": _length(compute) / per,
            "nccl_ms": _length(comm) / per, "nccl_exposed_ms": (_length(comm) - _overlap(comm, compute)) / per,
            "idle_ms": (span - busy) / per, "nccl_kernels_per_step": sum(is_comm) / steps,
            "top_kernels_ms": [[name, t / per] for name, t in top]}

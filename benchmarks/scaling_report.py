"""Tables for bench_scaling.py: throughput per GPU, weak-scaling efficiency, memory, the targets, loss parity.

Split from the driver so that running the benchmark and reading its numbers are separate jobs; this module
only formats rows the driver collected (it runs nothing).
"""

from __future__ import annotations

import platform
from importlib import metadata

SYSTEM_NAMES = {"dist_lm": "dist_lm", "hf": "HF+Accelerate"}
TOPOLOGY_NAMES = {"ddp": "DDP", "fsdp": "FSDP2"}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "accelerate", "transformers", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _fmt_k(v: float | None) -> str:
    return f"{v / 1e3:,.1f}k" if v is not None else "-"


def _fmt_gib(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"  # None: not on a GPU (dry run)


def _ok(r: dict | None) -> bool:
    return r is not None and "tokens_per_s_per_gpu" in r and "error" not in r


def _gpus(r: dict) -> int:
    return r.get("num_gpus", 2)  # rows written before --gpus existed were all 2-GPU runs


def print_table(parts: dict[str, dict]) -> None:
    """Merged table of every part found: shape x system x {1 GPU, N GPUs}, then parity, then the targets."""
    rows = [r for p in parts.values() if "comparisons" not in p for r in p["rows"]]
    for name, p in sorted(parts.items()):
        m = p["meta"]
        v = m["versions"]
        print(f"{name}: {m['date']} | {m.get('gpu', '?')} x{m.get('gpu_count', '?')} | torch {v['torch']} | "
              f"accelerate {v['accelerate']} | transformers {v['transformers']} | triton {v['triton']}")
    if rows:
        singles = {r["baseline_key"]: r for r in rows if r.get("topology") == "single" and _ok(r)}
        print("\n| shape | system | GPUs | compile | variant | 1 GPU tok/s | N GPUs tok/s/GPU | efficiency | "
              "peak GiB 1 GPU | peak GiB/GPU N GPUs | ours/HF 1 GPU | ours/HF N GPUs | warm-up s (N GPUs) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        multi = [r for r in rows if r.get("topology") in ("ddp", "fsdp")]
        multi.sort(key=lambda r: (r["shape"], not r["compiled"], r["system"], r["topology"], r.get("variant", ""),
                                  _gpus(r)))
        for r in multi:
            base = singles.get(r["baseline_key"])
            hf2 = next((q for q in rows if q["system"] == "hf" and q["shape"] == r["shape"] and q["topology"] ==
                        r["topology"] and _gpus(q) == _gpus(r) and q["compiled"] == r["compiled"]
                        and not q.get("variant") and _ok(q)), None)
            hf1 = next((q for q in rows if q["system"] == "hf" and q["shape"] == r["shape"] and q["topology"] ==
                        "single" and q["compiled"] == r["compiled"] and _ok(q)), None)
            name = f"{SYSTEM_NAMES[r['system']]} {TOPOLOGY_NAMES[r['topology']]}"
            tps2 = r.get("tokens_per_s_per_gpu") if _ok(r) else None
            tps1 = base["tokens_per_s_per_gpu"] if base else None
            eff = f"{100 * tps2 / tps1:.1f}%" if tps1 and tps2 else "-"
            ratio1 = (f"{tps1 / hf1['tokens_per_s_per_gpu']:.2f}x" if r["system"] == "dist_lm" and tps1 and hf1
                      else "-")
            ratio2 = (f"{tps2 / hf2['tokens_per_s_per_gpu']:.2f}x" if r["system"] == "dist_lm" and tps2 and hf2
                      else "-")
            mem1 = _fmt_gib(base["peak_mem_GiB"]) if base else "-"
            mem2 = _fmt_gib(r["peak_mem_GiB"]) if _ok(r) else r.get("error", "?")
            warm = f"{r['warmup_s']:.1f}" if _ok(r) else "-"
            how = r.get("compile", "compiled" if r["compiled"] else "eager")
            print(f"| {r['shape']} | {name} | {_gpus(r)} | {how} | {r.get('variant') or '-'} | {_fmt_k(tps1)} | "
                  f"{_fmt_k(tps2)} | {eff} | {mem1} | {mem2} | {ratio1} | {ratio2} | {warm} |")
        failed = [r for r in rows if "error" in r]
        for r in failed:
            print(f"  not measured: {r['label']}: {r['error']}")
        for r in rows:
            if r.get("note"):
                print(f"  note: {r['label']}: {r['note']}")
        print_targets(rows, singles)
    for p in parts.values():
        if "comparisons" in p:
            print_parity(p)


# The issues' targets: "Two GPUs" at 2 (DDP at both shapes, FSDP2 at 124m with less memory than DDP); "Four and
# eight GPUs" at 8 (124m). Other counts print the same thresholds, marked as not the issues' own.
DDP_TARGET, FSDP_TARGET = 0.95, 0.90


def print_targets(rows: list[dict], singles: dict[str, dict]) -> None:
    """The issues' targets, computed from the rows above (default variants only)."""
    def eff(system: str, topology: str, shape: str, n: int) -> tuple[float | None, dict | None]:
        r = next((q for q in rows if q["system"] == system and q["topology"] == topology and q["shape"] == shape
                  and _gpus(q) == n and q["compiled"] and not q.get("variant") and _ok(q)), None)
        base = singles.get(r["baseline_key"]) if r else None
        return (r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None), r

    def verdict(e: float | None, target: float) -> str:
        return "not measured" if e is None else f"{100 * e:.1f}% -> {'met' if e >= target else 'NOT met'}"

    counts = sorted({_gpus(r) for r in rows if r["system"] == "dist_lm" and r.get("topology") in ("ddp", "fsdp")})
    shapes = sorted({r["shape"] for r in rows if r["system"] == "dist_lm"})
    for n in counts:
        whose = {2: "issue 'Two GPUs'", 8: "issue 'Four and eight GPUs'"}.get(n, "the 8-GPU thresholds, for reference")
        print(f"\nTargets at {n} GPUs (compiled; {whose}):")
        for shape in shapes if n == 2 else [s for s in shapes if s == "124m"]:
            print(f"  DDP >= 95% at {shape}: " + verdict(eff("dist_lm", "ddp", shape, n)[0], DDP_TARGET))
        e, fsdp = eff("dist_lm", "fsdp", "124m", n)
        _, ddp = eff("dist_lm", "ddp", "124m", n)
        line = f"  FSDP2 >= 90% at 124m: {verdict(e, FSDP_TARGET)}"
        if fsdp is not None and ddp is not None:
            less = fsdp["peak_mem_GiB"] < ddp["peak_mem_GiB"]
            line += (f"; memory {fsdp['peak_mem_GiB']:.2f} vs DDP {ddp['peak_mem_GiB']:.2f} GiB/GPU -> "
                     f"{'less' if less else 'NOT less'}")
        print(line)
    fsdp_mem = {_gpus(r): r["peak_mem_GiB"] for r in rows if r["system"] == "dist_lm" and r.get("topology") == "fsdp"
                and r["shape"] == "124m" and r["compiled"] and not r.get("variant") and _ok(r)}
    if len(fsdp_mem) > 1:
        grows = any(fsdp_mem[b] > fsdp_mem[a] + 0.05 for a, b in zip(sorted(fsdp_mem), sorted(fsdp_mem)[1:]))
        print("  FSDP2 peak GiB/GPU at 124m by GPU count: " + ", ".join(f"{n}: {m:.2f}" for n, m in
                                                                       sorted(fsdp_mem.items()))
              + (" -> GROWS with N" if grows else " -> no growth with N"))


def print_parity(part: dict) -> None:
    print("\nLoss parity (real trainer, same global batch; |1 GPU x accumulation N - N GPUs| per optimizer step; "
          "'noise' rows: two 1-GPU runs of that batch, the yardstick):")
    print("| pair | steps | max abs diff (step) | mean abs diff | first loss | final 1 GPU | final N GPUs | "
          "trainer tok/s 1 GPU -> N GPUs (total, last interval) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in part.get("comparisons", []):
        if "error" in c:
            print(f"| {c['pair']} | {c['error']} | | | | | | |")
            continue
        final_n = c.get("final_ngpu", c.get("final_2gpu"))  # keys before --gpus said 2gpu
        tps_n = c.get("tokens_per_s_ngpu", c.get("tokens_per_s_2gpu"))
        print(f"| {c['pair']} | {c['steps']} | {c['max_abs_diff']:.4g} ({c['max_at_step']}) | "
              f"{c['mean_abs_diff']:.4g} | {c['first_1gpu']:.3f} | {c['final_1gpu']:.4f} | {final_n:.4f} | "
              f"{_fmt_k(c['tokens_per_s_1gpu'])} -> {_fmt_k(tps_n)} |")
    for r in part["rows"]:
        if "error" in r:
            print(f"  not run: {r['label']}: {r['error']}")

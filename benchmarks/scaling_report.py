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


def print_table(parts: dict[str, dict]) -> None:
    """Merged table of every part found: shape x system x {1 GPU, 2 GPUs}, then parity, then the targets."""
    rows = [r for p in parts.values() if "comparisons" not in p for r in p["rows"]]
    for name, p in sorted(parts.items()):
        m = p["meta"]
        v = m["versions"]
        print(f"{name}: {m['date']} | {m.get('gpu', '?')} x{m.get('gpu_count', '?')} | torch {v['torch']} | "
              f"accelerate {v['accelerate']} | transformers {v['transformers']} | triton {v['triton']}")
    if rows:
        singles = {r["baseline_key"]: r for r in rows if r.get("topology") == "single" and _ok(r)}
        print("\n| shape | system | compile | variant | 1 GPU tok/s | 2 GPUs tok/s/GPU | efficiency | peak GiB 1 GPU | "
              "peak GiB/GPU 2 GPUs | ours/HF 1 GPU | ours/HF 2 GPUs | warm-up s (2 GPUs) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        multi = [r for r in rows if r.get("topology") in ("ddp", "fsdp")]
        multi.sort(key=lambda r: (r["shape"], not r["compiled"], r["system"], r["topology"], r.get("variant", "")))
        for r in multi:
            base = singles.get(r["baseline_key"])
            hf2 = next((q for q in rows if q["system"] == "hf" and q["shape"] == r["shape"] and q["topology"] ==
                        r["topology"] and q["compiled"] == r["compiled"] and not q.get("variant") and _ok(q)), None)
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
            print(f"| {r['shape']} | {name} | {r.get('compile', 'compiled' if r['compiled'] else 'eager')} | "
                  f"{r.get('variant') or '-'} | {_fmt_k(tps1)} | {_fmt_k(tps2)} | {eff} | {mem1} | {mem2} | {ratio1} | "
                  f"{ratio2} | {warm} |")
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


def print_targets(rows: list[dict], singles: dict[str, dict]) -> None:
    """The issue's targets, computed from the rows above (default variants only)."""
    def eff(system: str, topology: str, shape: str) -> tuple[float | None, dict | None]:
        r = next((q for q in rows if q["system"] == system and q["topology"] == topology and q["shape"] == shape
                  and q["compiled"] and not q.get("variant") and _ok(q)), None)
        base = singles.get(r["baseline_key"]) if r else None
        return (r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None), r

    print("\nTargets (compiled, 2 GPUs):")
    for shape in sorted({r["shape"] for r in rows if r["system"] == "dist_lm"}):
        e, _ = eff("dist_lm", "ddp", shape)
        print(f"  DDP >= 95% at {shape}: " + ("not measured" if e is None else
                                                f"{100 * e:.1f}% -> {'met' if e >= 0.95 else 'NOT met'}"))
    e, fsdp = eff("dist_lm", "fsdp", "124m")
    _, ddp = eff("dist_lm", "ddp", "124m")
    if e is None or ddp is None:
        print("  FSDP2 >= 90% at 124m with less memory per GPU than DDP: not measured")
    else:
        less = fsdp["peak_mem_GiB"] < ddp["peak_mem_GiB"]
        print(f"  FSDP2 >= 90% at 124m: {100 * e:.1f}% -> {'met' if e >= 0.90 else 'NOT met'}; memory "
              f"{fsdp['peak_mem_GiB']:.2f} vs DDP {ddp['peak_mem_GiB']:.2f} GiB/GPU -> {'met' if less else 'NOT met'}")


def print_parity(part: dict) -> None:
    print("\nLoss parity (real trainer, same global batch; |1 GPU - 2 GPUs| per optimizer step):")
    print("| pair | steps | max abs diff (step) | mean abs diff | first loss | final 1 GPU | final 2 GPUs | "
          "trainer tok/s 1 GPU -> 2 GPUs (total, last interval) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in part.get("comparisons", []):
        if "error" in c:
            print(f"| {c['pair']} | {c['error']} | | | | | | |")
            continue
        print(f"| {c['pair']} | {c['steps']} | {c['max_abs_diff']:.4g} ({c['max_at_step']}) | "
              f"{c['mean_abs_diff']:.4g} | {c['first_1gpu']:.3f} | {c['final_1gpu']:.4f} | {c['final_2gpu']:.4f} | "
              f"{_fmt_k(c['tokens_per_s_1gpu'])} -> {_fmt_k(c['tokens_per_s_2gpu'])} |")
    for r in part["rows"]:
        if "error" in r:
            print(f"  not run: {r['label']}: {r['error']}")

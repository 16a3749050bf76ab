"""Loss parity for bench_scaling.py: the per-step train/loss of 1 GPU x accumulation N against N GPUs.

Split from the driver: this module only reads the trainer runs' metrics.jsonl files and compares them (it runs
nothing); bench_scaling.plan_parity plans the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from scaling_report import TOPOLOGY_NAMES


def read_run(run_dir: Path) -> tuple[dict[int, float], float | None]:
    """(train/loss by step, the last logged tokens/s) of one trainer run, from one read of its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the trainer run failed (see its log)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    speeds = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}, (speeds[-1] if speeds else None)


def compare_losses(rows: list[dict]) -> list[dict]:
    """One comparison row per multi-GPU run (and per noise run of --parity-noise) against the 1-GPU run at the
    same global batch (accumulation N): max and mean |loss difference| per step."""
    ok = [r for r in rows if "error" not in r]
    runs = {r["run_dir"]: read_run(Path(r["run_dir"])) for r in ok}  # each file once (a 1-GPU run pairs twice)
    out = []
    for r in ok:
        noise = r.get("noise")
        if r["topology"] == "single" and not noise:
            continue
        n = r.get("noise_for") or r["num_gpus"]
        single = next((q for q in ok if q["topology"] == "single" and q["grad_accum"] == n and not q.get("noise")),
                      None)
        pair = {None: f"{n} GPUs {TOPOLOGY_NAMES.get(r['topology'])}", "repeat": f"noise: 1 GPU accum {n} again",
                "one_batch": f"noise: 1 GPU one batch of {r['batch_per_gpu']}"}[noise] + f" vs 1 GPU accum {n}"
        if single is None:
            out.append({"pair": pair, "num_gpus": n, "error": f"the 1-GPU accum {n} run failed or did not run"})
            continue
        (ref, ref_tps), (other, other_tps) = runs[single["run_dir"]], runs[r["run_dir"]]
        steps = sorted(set(ref) & set(other))
        if not steps or len(steps) != len(ref):
            out.append({"pair": pair, "num_gpus": n, "error": f"steps differ: {len(ref)} vs {len(other)} logged"})
            continue
        diffs = {s: abs(ref[s] - other[s]) for s in steps}
        worst = max(diffs, key=diffs.get)
        out.append({"pair": pair, "num_gpus": n, "steps": len(steps),
                    "max_abs_diff": diffs[worst], "max_at_step": worst,
                    "mean_abs_diff": sum(diffs.values()) / len(diffs), "final_1gpu": ref[steps[-1]],
                    "final_ngpu": other[steps[-1]], "first_1gpu": ref[steps[0]],
                    "tokens_per_s_1gpu": ref_tps, "tokens_per_s_ngpu": other_tps,
                    # every step's losses, so the JSON alone tells where two curves parted (run dirs stay behind)
                    "losses_1gpu": [ref[s] for s in steps], "losses_ngpu": [other[s] for s in steps]})
    return out

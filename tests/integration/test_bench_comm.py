"""benchmarks/bench_comm.py's CPU dry run (2 gloo processes): the collectives table and, with --overlap, the
matmul chain timed alone and beside an all-reduce."""

import re
import subprocess
import sys

from conftest import ROOT, checkout_env, ok


def test_bench_comm_dry_run_with_overlap():
    out = ok(subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_comm.py"), "--dry-run", "--overlap"],
                            capture_output=True, text=True, timeout=300, env=checkout_env())).stdout
    for collective in ("all_reduce", "all_gather", "reduce_scatter"):
        assert re.search(rf"\| {collective} \| float32 \| 1 \| [\d.]+ \| [\d.]+ \|", out), out
    row = re.search(r"\| default \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| (-?\d+)% \|", out)
    assert row, out
    reduce_ms, alone_ms, beside_ms, slowdown_ms, _ = row.groups()
    assert float(reduce_ms) > 0 and float(alone_ms) > 0 and float(beside_ms) > 0
    assert abs(float(beside_ms) - float(alone_ms) - float(slowdown_ms)) < 2e-3  # the printed difference is theirs

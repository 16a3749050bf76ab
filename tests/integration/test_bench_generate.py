"""benchmarks/bench_generate.py --quick on the CPU: every system runs, the table has its rows and ratios, --save
writes the "generate" table, and transformers gives our greedy tokens from our weights."""

import json
import re
import subprocess
import sys

from conftest import ROOT, checkout_env, ok


def test_bench_generate_quick(tmp_path):
    saved = tmp_path / "generate.json"
    proc = ok(subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--quick", "--save",
                              str(saved)], capture_output=True, text=True, timeout=120,
                             env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    out = proc.stdout
    assert re.search(r"^CPU .* \| torch \S+ \| transformers \S+", out, re.M), out
    for system in ("ours", "hf-dynamic", "hf-static"):
        assert re.search(rf"\| {system} \| [\d,]+ \| [\d.]+ \|", out), out
    assert re.search(r"\| ours \| [\d,]+ \| [\d.]+ \| [\d.]+x \|", out), out  # the ratio to HF static
    data = json.loads(saved.read_text())
    rows = data["tables"]["generate"]
    assert {(r["batch"], r["system"]) for r in rows} == {(b, s) for b in (1, 4)
                                                         for s in ("ours", "hf-dynamic", "hf-static")}
    assert all("error" not in r for r in rows), rows
    # the same greedy tokens as transformers from the same weights (fp32 on the CPU)
    assert all(r["match"] == 1.0 for r in rows if r["system"] != "ours"), rows

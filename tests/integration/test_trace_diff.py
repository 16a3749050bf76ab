"""benchmarks/trace_diff.py on two small hand-made traces: the GEMM beside an all-reduce is told apart from the
others, graph-renumbered inductor kernels count as the same work, and each stream's gaps are per step."""

import gzip
import json
import subprocess
import sys

from conftest import ROOT, checkout_env, ok

SCRIPT = ROOT / "benchmarks" / "trace_diff.py"


def kernel(name: str, ts: float, dur: float, stream: int = 7) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def step(t0: float, *, ddp: bool) -> list[dict]:
    """One step: two GEMMs and an inductor kernel; under DDP the second GEMM runs beside an all-reduce (and takes
    twice as long), the inductor kernel carries another graph's number, and a bucket copy follows."""
    events = [kernel("nvjet_sm90_gemm_a", t0, 10.0),
              kernel("nvjet_sm90_gemm_b", t0 + 12, 20.0 if ddp else 10.0),
              kernel("triton_poi_fused_mul_3" if ddp else "triton_poi_fused_mul_1", t0 + 34, 5.0)]
    if ddp:
        events += [kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", t0 + 12, 25.0, stream=17),
                   {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": t0 + 40,
                    "dur": 4.0, "args": {"stream": 7}}]
    return events


def write_trace(path, ddp: bool) -> None:
    events = [e for i in range(3) for e in step(100.0 * i, ddp=ddp)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1})  # host events are skipped
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_trace_diff_separates_gemms_beside_nccl(tmp_path):
    base, other = tmp_path / "single.json.gz", tmp_path / "ddp.json.gz"
    write_trace(base, ddp=False)
    write_trace(other, ddp=True)
    out = ok(subprocess.run([sys.executable, str(SCRIPT), str(base), str(other)], capture_output=True, text=True,
                            timeout=60, env=checkout_env())).stdout
    # the middle step's GEMMs: one beside the all-reduce (10 -> 20 us), one alone (10 -> 10 us)
    assert "1 ran beside an NCCL kernel, 0.01 -> 0.02 ms (+100%); the others 0.01 -> 0.01 ms (+0%)" in out, out
    # inductor's _1 and _3 are the same kind of work: equal time, no difference
    assert "| inductor (Triton) kernels | 0.005 | 0.005 | +0.000 |" in out, out
    assert "| Memcpy DtoD | 0.000 | 0.004 | +0.004 |" in out, out
    # per stream and per step: the NCCL stream's one 25 us all-reduce; the compute stream's 39 us of work and its
    # gaps, 5 us inside each step and 56 us between steps (127 us over 3 steps)
    assert "stream 17: 1 kernels, busy 0.03 ms" in out, out
    assert "stream 7: 4 kernels, busy 0.04 ms, gaps 0.04 ms" in out, out


def test_trace_diff_refuses_traces_of_different_steps(tmp_path):
    base, other = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    write_trace(base, ddp=False)
    with gzip.open(other, "wt") as f:
        json.dump({"traceEvents": step(0.0, ddp=True)}, f)  # one step only
    proc = subprocess.run([sys.executable, str(SCRIPT), str(base), str(other)], capture_output=True, text=True,
                          timeout=60, env=checkout_env())
    assert proc.returncode != 0 and "differ in GEMM count" in proc.stderr, proc.stderr


def test_trace_diff_says_when_a_trace_has_no_gpu_kernels(tmp_path):
    base, other = tmp_path / "a.json.gz", tmp_path / "cpu.json.gz"
    write_trace(base, ddp=False)
    with gzip.open(other, "wt") as f:  # what a CPU dry run's profile holds: host events only
        json.dump({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}]}, f)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(base), str(other)], capture_output=True, text=True,
                          timeout=60, env=checkout_env())
    assert proc.returncode != 0 and "no GPU kernels in this trace" in proc.stderr, proc.stderr


def test_attention_kernels_with_cutlass_types_are_not_gemms():
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_diff", SCRIPT)
    trace_diff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_diff)
    assert trace_diff.kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<cutlass::bfloat16_t>>(")\
        != "GEMM"
    assert trace_diff.kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "GEMM"
    assert trace_diff.kind("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>(Params)") == "GEMM"
    assert trace_diff.kind("triton_poi_fused_mul_12") == "triton_poi_fused_mul"

"""Training-step throughput: dist_lm (the trainer's code path) vs Hugging Face LlamaForCausalLM, eager and compiled.

Run on one CUDA GPU: `python benchmarks/bench_train.py [--shapes 124m,tinystories] [--systems ...] [--quick]
[--save PATH]` (writes $OUT/bench_train_<shapes>.json, every raw figure, when OUT is set). `--profile SHAPE`
instead profiles a few steps of dist_lm compiled and prints the top-15 CUDA kernels by total time.

What one step is, for both systems: bf16 autocast over fp32 parameters, forward + loss, backward, global
grad-norm clip to 1.0 (the trainer's default; `--no-clip` drops it from both), AdamW, zero_grad(set_to_none).
- HF: transformers.LlamaForCausalLM(attn_implementation="sdpa"), torch.optim.AdamW(fused=True),
  torch.nn.utils.clip_grad_norm_; eager and torch.compile(model). Labels = input ids (HF shifts them
  inside, so its loss covers T-1 positions of the same tokens).
- dist_lm: TransformerLM(attention_backend="auto", fused_loss=True), dist_lm AdamW(fused=True) over
  dist_lm.optim.param_groups, dist_lm.optim.clip_grad_norm, and dist_lm.parallel.apply_parallelism
  for compilation (`--compile-mode model|blocks|cudagraphs`, default the trainer's train.compile_mode,
  `--activation-checkpointing`): what the trainer runs.
`--systems ...,ours-compiled-det` adds ours compiled in train.deterministic's mode (dist_lm.train.determinism), to
price bitwise reproducibility.
Both see the same random tokens (one fixed batch; the work does not depend on the values).

Measured: compile/warm-up wall time (the first `--warmup` steps, synchronised), then `--steps` steps between
two CUDA events: step time, tokens/s, MFU = tokens/s * dist_lm.train.metrics.flops_per_token / 989e12
(H100 dense bf16; the same formula and ModelConfig for HF), and peak torch.cuda.max_memory_allocated
(reset before each system is built; models freed and dynamo reset between systems).

`--save PATH` writes the results file (benchmarks/render.py's format, the targets checked). A new run updates the
README: on the device `--save $OUT/train.json` (train_deterministic.json for the -det comparison, train_seed.json
for the seed shapes), copy it over the file of that name in benchmarks/results/, then `python benchmarks/render.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import command_line, package_versions, write_results  # noqa: E402

from dist_lm.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from dist_lm.model import TransformerLM  # noqa: E402
from dist_lm.optim import AdamW, clip_grad_norm, param_groups  # noqa: E402
from dist_lm.parallel import COMPILE_MODES, apply_parallelism  # noqa: E402
from dist_lm.train.determinism import deterministic  # noqa: E402
from dist_lm.train.metrics import flops_per_token  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
# name: (model config kwargs, batch size)
SHAPES: dict[str, tuple[dict, int]] = {
    "124m": (dict(d_model=768, num_layers=12, num_heads=12, d_ff=2048, vocab_size=32000, seq_len=1024), 16),
    "tinystories": (dict(d_model=512, num_layers=8, num_heads=16, d_ff=1344, vocab_size=10000, seq_len=256), 128),
    "seed-b32": (dict(d_model=512, num_layers=12, num_heads=8, vocab_size=10000, seq_len=256), 32),
    "seed-b128": (dict(d_model=512, num_layers=12, num_heads=8, vocab_size=10000, seq_len=256), 128),
}
SYSTEMS = ("hf-eager", "hf-compiled", "ours-eager", "ours-compiled")
# on request (--systems): ours compiled with activation checkpointing; ours compiled in train.deterministic's mode
EXTRA_SYSTEMS = ("ours-compiled-ckpt", "ours-compiled-det")
HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
MAX_WINDOWS = 5


def window_sizes(steps: int) -> list[int]:
    """Timed steps split into up to MAX_WINDOWS windows of at least 5 steps (each window refills the pipeline).

    The median window is reported: the lent machines showed one-off host stalls that moved a single mean over
    all steps by 20-30% between calls (bench_scaling's worker times its windows the same way)."""
    windows = max(1, min(MAX_WINDOWS, steps // 5))
    return [steps // windows + (i < steps % windows) for i in range(windows)]


def _hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim(),
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa", use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"  # older transformers ignore the constructor argument
    return LlamaForCausalLM(hf_cfg)


def build(system: str, cfg: ModelConfig, compile_mode: str, checkpointing: bool, clip: bool):
    """(step function taking (x, y), the module) for one system, on CUDA."""
    compiled = "compiled" in system
    checkpointing = checkpointing or system.endswith("-ckpt")
    if system.startswith("hf"):
        model = _hf_model(cfg).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), **HYPER, weight_decay=WEIGHT_DECAY, fused=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fwd = torch.compile(model) if compiled else model

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(input_ids=x, labels=x).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, model

    run_cfg = RunConfig(model=cfg)
    run_cfg.train.compile = compiled
    run_cfg.train.activation_checkpointing = checkpointing
    raw = TransformerLM(cfg).cuda().train()
    opt = AdamW(param_groups(raw, WEIGHT_DECAY), **HYPER, fused=True)
    model = apply_parallelism(raw, run_cfg, compile_mode=compile_mode)

    graphs = compiled and compile_mode == "cudagraphs"

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        if clip:
            clip_grad_norm(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    return step, raw


def _free() -> None:
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def measure(shape: str, system: str, args) -> dict:
    kwargs, batch = SHAPES[shape]
    cfg = ModelConfig(**kwargs, attention_backend="auto", fused_loss=True)
    steps, warmup = args.steps, args.warmup
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen).cuda()
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    row = {"shape": shape, "system": system, "batch": batch, "seq_len": cfg.seq_len}
    _free()
    torch.cuda.reset_peak_memory_stats()
    try:
        torch.manual_seed(0)
        step, model = build(system, cfg, args.compile_mode, args.activation_checkpointing, not args.no_clip)
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(warmup):
            loss = step(x, y)
        torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t0  # includes compilation (and autotuning) for compiled systems
        window_ms = []
        for size in window_sizes(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(size):
                loss = step(x, y)
            end.record()
            torch.cuda.synchronize()
            window_ms.append(start.elapsed_time(end) / size)
        ms = statistics.median(window_ms)
        row.update(step_ms=ms, step_ms_windows=window_ms, tokens_per_s=batch * cfg.seq_len / (ms * 1e-3),
                   loss=loss.item(), peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30)
        row["mfu"] = row["tokens_per_s"] * flops_per_token(cfg) / PEAK_FLOPS
        if not math.isfinite(row["loss"]):
            row["error"] = "non-finite loss"
        del step, model
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    _free()
    print(f"  {shape:12s} {system:14s} " + (f"{row['step_ms']:8.2f} ms  {row['tokens_per_s'] / 1e3:8.1f}k tok/s  "
          f"warmup {row['warmup_s']:.1f}s" if "step_ms" in row else row.get("error", "?")), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    import triton

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "missing"

    print(f"\nGPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"transformers {tf_version} | python {platform.python_version()}")
    print("| shape | system | tokens/s | MFU | step ms | vs HF compiled | peak mem GiB | warmup/compile s | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" not in r:
            print(f"| {r['shape']} | {r['system']} | {r.get('error')} | | | | | | |")
            continue
        ref = next((q for q in rows if q["shape"] == r["shape"] and q["system"] == "hf-compiled" and "step_ms" in q),
                   None)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        print(f"| {r['shape']} (b{r['batch']}) | {r['system']} | {r['tokens_per_s'] / 1e3:,.0f}k | "
              f"{100 * r['mfu']:.1f}% | {r['step_ms']:.2f} | {ratio} | {r['peak_mem_GiB']:.2f} | "
              f"{r['warmup_s']:.1f} | {r['loss']:.3f} |")
    for r in rows:  # what activation checkpointing costs and saves, against the same system without it
        base = next((q for q in rows if q["shape"] == r["shape"] and q["system"] == r["system"].removesuffix("-ckpt")
                     and "step_ms" in q), None)
        if r["system"].endswith("-ckpt") and "step_ms" in r and base is not None:
            print(f"activation checkpointing, {r['shape']}: step {base['step_ms']:.2f} -> {r['step_ms']:.2f} ms "
                  f"({r['step_ms'] / base['step_ms']:.2f}x), peak memory {base['peak_mem_GiB']:.2f} -> "
                  f"{r['peak_mem_GiB']:.2f} GiB ({r['peak_mem_GiB'] / base['peak_mem_GiB']:.2f}x)")


# The targets ("Fast on one H100"): dist_lm compiled against HF compiled, tokens/s, per shape.
TARGETS = {"124m": 1.15, "tinystories": 1.2}


def results_rows(rows: list[dict]) -> list[dict]:
    """bench rows -> the results file's "train" rows: ratios against HF compiled of the same shape, and for a
    deterministic-mode system its step time against the mean of the same shape's ours-compiled rows.

    >>> rows = [{"shape": "124m", "system": "hf-compiled", "tokens_per_s": 400e3, "step_ms": 40.0, "mfu": 0.3,
    ...          "peak_mem_GiB": 9.9, "warmup_s": 20.0, "batch": 16},
    ...         {"shape": "124m", "system": "ours-compiled", "tokens_per_s": 500e3, "step_ms": 32.0, "mfu": 0.36,
    ...          "peak_mem_GiB": 8.5, "warmup_s": 21.0, "batch": 16},
    ...         {"shape": "124m", "system": "ours-compiled-det", "tokens_per_s": 480e3, "step_ms": 33.6, "mfu": 0.35,
    ...          "peak_mem_GiB": 8.5, "warmup_s": 25.0, "batch": 16},
    ...         {"shape": "124m", "system": "ours-eager", "error": "OOM", "batch": 16}]
    >>> for r in results_rows(rows):
    ...     print(r["system"], r.get("vs_hf_compiled"), round(r.get("vs_default", 0), 4), r.get("error"))
    hf-compiled 1.0 0 None
    ours-compiled 1.25 0 None
    ours-compiled-det 1.2 0.05 None
    ours-eager None 0 OOM
    """
    out = []
    for r in rows:
        row = {"shape": r["shape"], "system": r["system"]}
        if "step_ms" not in r:
            out.append({**row, "error": r.get("error", "?")})
            continue
        row.update(tokens_per_s=r["tokens_per_s"], mfu=r["mfu"], step_ms=r["step_ms"])
        ref = next((q for q in rows if q["shape"] == r["shape"] and q["system"] == "hf-compiled" and "step_ms" in q),
                   None)
        if ref is not None:
            row["vs_hf_compiled"] = r["tokens_per_s"] / ref["tokens_per_s"]
        default = [q["step_ms"] for q in rows if q["shape"] == r["shape"] and q["system"] == "ours-compiled"
                   and "step_ms" in q]
        if r["system"].endswith("-det") and default:
            row["vs_default"] = r["step_ms"] / statistics.mean(default) - 1
        row.update(peak_mem_GiB=r["peak_mem_GiB"], warmup_s=r["warmup_s"])
        out.append(row)
    return out


def target_rows(table: list[dict]) -> list[dict]:
    """TARGETS, for each shape of the table where both ours-compiled and hf-compiled ran."""
    out = []
    for shape, need in TARGETS.items():
        ours = next((r for r in table if r["shape"] == shape and r["system"] == "ours-compiled"
                     and "vs_hf_compiled" in r), None)
        if ours is not None:
            out.append({"target": f"≥{need}x HF compiled at {shape}", "result": f"{ours['vs_hf_compiled']:.2f}x",
                        "met": ours["vs_hf_compiled"] >= need})
    return out


def profile(shape: str, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    kwargs, batch = SHAPES[shape]
    cfg = ModelConfig(**kwargs, attention_backend="auto", fused_loss=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1)).cuda()
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    step, _ = build("ours-compiled", cfg, args.compile_mode, args.activation_checkpointing, not args.no_clip)
    for _ in range(max(args.warmup, 3)):
        step(x, y)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(x, y)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        try:
            print(averages.table(sort_by=key, row_limit=15, max_name_column_width=90))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    if os.environ.get("OUT"):
        prof.export_chrome_trace(str(Path(os.environ["OUT"]) / f"trace_{shape}.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma list of {list(SYSTEMS + EXTRA_SYSTEMS)} (the last ones only when named)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--quick", action="store_true", help="tinystories only, 10 timed steps, 3 warm-up")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=TrainConfig.compile_mode,
                        help="dist_lm compile granularity (dist_lm.parallel.apply_compile)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both systems recompute blocks")
    parser.add_argument("--no-clip", action="store_true", help="skip grad-norm clipping in both systems")
    parser.add_argument("--profile", metavar="SHAPE", choices=tuple(SHAPES), help="profile dist_lm compiled only")
    parser.add_argument("--save", type=Path, default=None, help="also write the results file here")
    parser.add_argument("--title", default="Training step: dist_lm vs HF Llama, one GPU",
                        help="the results file's title (--save)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA device")
    if args.profile:
        profile(args.profile, args)
        return
    if args.quick:
        args.shapes, args.steps, args.warmup = "tinystories", 10, 3
    shapes = [s for s in args.shapes.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for name, known in (("shape", SHAPES), ("system", SYSTEMS + EXTRA_SYSTEMS)):
        bad = [s for s in (shapes if name == "shape" else systems) if s not in known]
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {list(known)}")
    if args.activation_checkpointing and any(s.endswith("-ckpt") for s in systems):
        raise SystemExit("--activation-checkpointing turns checkpointing on in every system, so the -ckpt system "
                         "would be compared with itself; drop one of the two")
    rows = []
    for shape in shapes:
        for system in systems:
            with deterministic(system.endswith("-det")):  # compile and steps inside the mode
                rows.append(measure(shape, system, args))
    print_table(rows)
    if args.save:
        table = results_rows(rows)
        write_results(args.save, title=args.title,
                      hardware={"gpu": torch.cuda.get_device_name(), "gpu_count": 1},
                      versions=package_versions("torch", "triton", "transformers"),
                      commands=[command_line("benchmarks/bench_train.py")], tables={"train": table},
                      targets=target_rows(table))
        print(f"wrote {args.save}")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        args_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}  # --save is a Path
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": args_json}
        (Path(out) / f"bench_train_{'_'.join(shapes)}_{args.compile_mode}.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Generation throughput: dist_lm generate_batch vs Hugging Face LlamaForCausalLM.generate, same weights.

Run on one CUDA GPU: `python benchmarks/bench_generate.py [--shapes 124m,seed] [--batches 1,8,64]
[--systems ours,hf-dynamic,hf-static] [--repeat 3] [--save PATH]`; `--quick` is a tiny smoke run on the CPU (the
format, not a measurement).

What is measured, for each shape and batch: greedy decoding of `--new-tokens` (256) tokens after a `--prompt-len`
(64) token prompt of random ids, every row to full length (no eos), bf16 weights on CUDA (fp32 on the CPU).
- ours: dist_lm.model.generation.generate_batch (static KV cache, the decode step compiled with
  mode="reduce-overhead", prefill through the model's attention backend, `auto`).
- hf-dynamic: transformers generate with its default (dynamic) cache, eager, attn_implementation="sdpa".
- hf-static: generate(cache_implementation="static"), which transformers compiles itself on CUDA.
HF's model is a LlamaForCausalLM built from dist_lm.export's config and our weights renamed (dist_lm.export.hf_name),
so both systems run the same network (the export test checks the logits agree).
Time is wall-clock around the whole call, synchronised: tokens/s = batch * new tokens / time; time to first token
(TTFT) is the same call with one new token. Each figure is the median of --repeat calls after one untimed call of
each kind (compilation and CUDA-graph recording happen there; their time is reported as warm-up).
"match" is the share of rows whose first 32 greedy tokens equal ours (bf16 rounding may split near-ties later).

Shapes: 124m (d768, 12 layers, 12 heads, d_ff 2048, vocab 32,000, issue 24's figures), seed (configs/
tinystories_seed.yaml, 48.8M) and demo (configs/demo.yaml); seq_len is set to 1024 for all, so that 64 + 256
tokens fit the window of either system (RoPE has no weights: the window changes no parameter).

`--save PATH` writes a results file (benchmarks/render.py's format) with a "generate" table; the issue's targets
(≥ 2x hf-static at batch 1, ≥ 1.5x hf at batch 64, 124m) are checked.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import render  # noqa: E402
from render import command_line, package_versions, write_results  # noqa: E402

from dist_lm.config import ModelConfig, load_config  # noqa: E402
from dist_lm.export import hf_name, llama_config  # noqa: E402
from dist_lm.model import TransformerLM  # noqa: E402
from dist_lm.model.generation import cast_for_inference, generate_batch  # noqa: E402

SEQ_LEN = 1024
SHAPES = {
    "124m": lambda: ModelConfig(d_model=768, num_layers=12, num_heads=12, d_ff=2048, vocab_size=32000, seq_len=SEQ_LEN),
    "seed": lambda: _from_yaml("tinystories_seed.yaml"),
    "demo": lambda: _from_yaml("demo.yaml"),
    "tiny": lambda: ModelConfig(d_model=64, num_layers=2, num_heads=4, vocab_size=512, seq_len=64),  # --quick
}
SYSTEMS = ("ours", "hf-dynamic", "hf-static")
MATCH_TOKENS = 32


def _from_yaml(name: str) -> ModelConfig:
    cfg = load_config(ROOT / "configs" / name).model
    cfg.seq_len = SEQ_LEN
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_models(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """(ours, HF) with the same random weights, in eval mode, on device, in dtype."""
    torch.manual_seed(0)
    ours = cast_for_inference(TransformerLM(cfg).to(device).eval(), dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in llama_config(cfg, eos_id=0).items() if k not in ("architectures", "model_type")}
    fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_cfg = LlamaConfig(**fields, attn_implementation="sdpa")
    hf_cfg._attn_implementation = "sdpa"  # older transformers ignore the constructor argument
    hf = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    hf.load_state_dict({hf_name(k): v for k, v in ours.state_dict().items()})
    return ours, hf


def runner(system: str, ours, hf, prompts: torch.Tensor):
    """A function (new_tokens) -> list of each row's new token ids, for one system."""
    if system == "ours":
        rows = prompts.tolist()
        return lambda n: generate_batch(ours, rows, n, temperature=0)
    extra = {"cache_implementation": "static"} if system == "hf-static" else {}

    def run(n: int) -> list[list[int]]:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
        return out[:, prompts.shape[1]:].tolist()

    return run


def timed(fn, n: int, device: torch.device) -> tuple[float, list[list[int]]]:
    _sync(device)
    start = time.perf_counter()
    out = fn(n)
    _sync(device)
    return time.perf_counter() - start, out


def measure(shape: str, batch: int, system: str, models, args, device: torch.device) -> dict:
    cfg = models[0].cfg
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
    row: dict = {"shape": shape, "batch": batch, "system": system}
    try:
        run = runner(system, *models, prompts)
        warm_full, tokens = timed(run, args.new_tokens, device)  # compiles, records graphs
        warm_first, _ = timed(run, 1, device)
        row["warmup_s"] = warm_full + warm_first
        full = [timed(run, args.new_tokens, device)[0] for _ in range(args.repeat)]
        first = [timed(run, 1, device)[0] for _ in range(args.repeat)]
        row.update(tokens_per_s=batch * args.new_tokens / statistics.median(full),
                   ttft_ms=1e3 * statistics.median(first), tokens=tokens)
    except Exception as exc:  # one system's failure (OOM, a compile error) must not lose the other rows
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    print(f"  {shape:6s} b{batch:<3d} {system:11s} " + (
        f"{row['tokens_per_s']:10,.0f} tok/s  TTFT {row['ttft_ms']:7.1f} ms  warm-up {row['warmup_s']:.1f}s"
        if "error" not in row else row["error"]), flush=True)
    _free(device)
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with ours/HF-static of its (shape, batch) on ours' row and the share of rows matching ours' tokens;
    the token lists dropped."""
    out = []
    for r in rows:
        peers = {q["system"]: q for q in rows if (q["shape"], q["batch"]) == (r["shape"], r["batch"])}
        new = {k: v for k, v in r.items() if k != "tokens"}
        ours, static = peers.get("ours", {}), peers.get("hf-static", {})
        if r["system"] == "ours" and "tokens_per_s" in r and "tokens_per_s" in static:
            new["ours_over_hf_static"] = r["tokens_per_s"] / static["tokens_per_s"]
        if r["system"] != "ours" and "tokens" in r and "tokens" in ours:
            same = [a[:MATCH_TOKENS] == b[:MATCH_TOKENS] for a, b in zip(r["tokens"], ours["tokens"])]
            new["match"] = sum(same) / len(same)
        out.append(new)
    return out


def print_table(rows: list[dict], device: torch.device) -> None:
    if device.type == "cuda":
        import triton

        hw = f"GPU {torch.cuda.get_device_name()} | triton {triton.__version__}"
    else:
        hw = f"CPU {platform.processor() or platform.machine()}"
    versions = package_versions("transformers")["transformers"]
    print(f"\n{hw} | torch {torch.__version__} | transformers {versions} | python {platform.python_version()}")
    print("\n".join(render.table("generate", rows)))


def targets(rows: list[dict]) -> list[dict]:
    """Issue 24's targets at 124m: ours >= 2x hf-static at batch 1, >= 1.5x the faster HF system at batch 64."""
    def tps(batch: int, system: str) -> float | None:
        return next((r.get("tokens_per_s") for r in rows if (r["shape"], r["batch"], r["system"]) ==
                     ("124m", batch, system)), None)

    out = []
    for batch, need, refs in ((1, 2.0, ("hf-static",)), (64, 1.5, ("hf-static", "hf-dynamic"))):
        ours, best = tps(batch, "ours"), max((tps(batch, s) or 0 for s in refs), default=0)
        if ours and best:
            out.append({"target": f"≥ {need}x transformers at 124m, batch {batch}", "met": ours / best >= need,
                        "result": f"{ours:,.0f} tokens/s, {ours / best:.2f}x"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="124m,seed", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {list(SYSTEMS)}")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per figure (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU: the format, in seconds")
    parser.add_argument("--save", type=Path, default=None, help="also write the results file here")
    parser.add_argument("--title", default="Generation: dist_lm vs transformers, one GPU")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches, args.prompt_len, args.new_tokens, args.repeat = "tiny", "1,4", 8, 16, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_generate needs a CUDA device (or --quick for a CPU smoke run)")
    else:
        device = torch.device("cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, systems = args.shapes.split(","), args.systems.split(",")
    for name, given, known in (("shape", shapes, SHAPES), ("system", systems, SYSTEMS)):
        if bad := [s for s in given if s not in known]:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {list(known)}")
    rows = []
    for shape in shapes:
        models = build_models(SHAPES[shape](), device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            rows += [measure(shape, batch, system, models, args, device) for system in systems]
        del models
        _free(device)
    table = with_ratios(rows)
    print_table(table, device)
    if args.save:
        hardware = ({"gpu": torch.cuda.get_device_name(), "gpu_count": 1} if device.type == "cuda"
                    else {"cpu": platform.processor() or platform.machine()})
        write_results(args.save, title=args.title, hardware=hardware,
                      versions=package_versions("torch", "triton", "transformers"),
                      commands=[command_line("benchmarks/bench_generate.py")], tables={"generate": table},
                      targets=targets(table),
                      notes=[f"bf16 on CUDA, greedy, {args.prompt_len}-token prompts, {args.new_tokens} new tokens"])
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()

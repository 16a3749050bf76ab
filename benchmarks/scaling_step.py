"""One configuration of benchmarks/bench_scaling.py: the per-process worker, started by `accelerate launch`.

usage: python -m accelerate.commands.launch --config_file X.yaml --num_processes N benchmarks/scaling_step.py
       --system {dist_lm,hf} --shape SHAPE [--no-compile] [--compile-mode model|blocks|cudagraphs] [DDP knobs]

Rank 0 prints one line `SCALING_ROW {json}` at the end: tokens/s per GPU (the median of up to 5 timed windows,
each window's time that of its slowest rank), every window's step time, peak memory (max over ranks), warm-up
time. The topology (1 process, DDP, FSDP2) comes only from the accelerate config it was launched
with, exactly as for the trainer.

Design decisions:
- dist_lm is built as dist_lm.train.run.build_run builds it: Accelerator(bf16), TransformerLM, the trainer's own
  `fsdp_options` (imported, not re-derived), apply_parallelism, our AdamW(fused=None) on the (possibly sharded)
  parameters, then `prepare_data_parallel` for DDP / one GPU, or the optimizer wrapped in AcceleratedOptimizer
  under FSDP2.
- The timed step is a copy of the trainer's optimizer_step (dist_lm/train/trainer.py: lr set on the groups,
  accumulate, backward, unscale, our clip_grad_norm, step, zero_grad), which needs a whole Run (data, logger,
  schedule) that a benchmark does not build. Keep the two in step by hand.
- The HF anchor is what an Accelerate user writes: LlamaForCausalLM (bench_train._hf_model, same shapes),
  torch.optim.AdamW(fused=True), accelerator.clip_grad_norm_. It is compiled before `prepare` (the issue's
  "compiled before prepare"): for DDP, the faster of Accelerate's two ways; for FSDP2 the plugin then shards the
  compiled module (or, with `--hf-compile accelerate`, the launcher config's dynamo settings compile it instead).
- Tokens: one random batch per rank, fixed for the run, drawn from seed + rank (the data differ across ranks, as
  in training; the work does not depend on the values). They live on the GPU; `--h2d` instead copies a host
  batch each micro-step through the trainer's pinned-memory path.
- Timing: `--steps` optimizer steps after `--warmup` untimed ones (compilation happens there), in up to 5
  windows, each behind a barrier and torch.cuda.synchronize, timed with perf_counter. Every rank times itself;
  a window counts at its slowest rank, since data-parallel ranks wait for each other; the row reports the
  median window (the spread is in step_ms_windows).
- `--dry-run`: a tiny shape, one warm-up and one timed step, on whatever device there is (the CPU over gloo here),
  to check construction and the step without a GPU.
"""

from __future__ import annotations

import os

# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM on the shared device hosts (KINDS.md): set before torch
# or NCCL load. Forced rather than setdefault: an inherited "1" must not switch it back on.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import HYPER, PEAK_FLOPS, SHAPES, WEIGHT_DECAY, _hf_model, window_sizes  # noqa: E402
from scaling_common import free_port, profile_summary, sync_device  # noqa: E402

from dist_lm.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from dist_lm.model import TransformerLM  # noqa: E402
from dist_lm.optim import AdamW, clip_grad_norm, param_groups  # noqa: E402
from dist_lm.parallel import (  # noqa: E402
    COMPILE_MODES,
    FSDP_UNITS,
    align_compiled_pieces_with_buckets,
    apply_parallelism,
    compiled_as,
    configure_ddp,
    cuda_graphs,
    ddp_kwargs,
    fsdp_options,
    prepare_data_parallel,
    replicate,
)
from dist_lm.train.metrics import flops_per_token  # noqa: E402
from dist_lm.train.trainer import to_device  # noqa: E402

ROW_PREFIX = "SCALING_ROW "
# vocabulary of the shipped 10k tokenizer, so that a dry run can read the bundled sample's tokens (--tokens DIR)
DRY_RUN_SHAPE = (dict(d_model=64, num_layers=2, num_heads=2, d_ff=128, vocab_size=10000, seq_len=32), 2)
GRAD_CLIP = 1.0  # the trainer's default optim.grad_clip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=("dist_lm", "hf"), required=True)
    p.add_argument("--shape", default="tinystories", help=f"one of {list(SHAPES)} (ignored with --dry-run)")
    p.add_argument("--batch", type=int, default=0, help="sequences per GPU per micro-step (0: the shape's)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--no-compile", action="store_true", help="eager (default: compiled)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=TrainConfig.compile_mode,
                   help="dist_lm compile granularity without FSDP (FSDP2 follows --fsdp-unit)")
    p.add_argument("--hf-compile", choices=("before-prepare", "accelerate"), default="before-prepare",
                   help="HF: torch.compile the model before prepare, or leave it to the launcher config's dynamo "
                        "settings (for the FSDP2 plugin's regional compilation)")
    p.add_argument("--no-clip", action="store_true", help="skip gradient clipping (both systems)")
    p.add_argument("--h2d", action="store_true", help="dist_lm: copy a host batch each micro-step (trainer path)")
    p.add_argument("--steps", type=int, default=25, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first (compilation)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16")
    # DDP knobs (accelerate.utils.DistributedDataParallelKwargs) over --ddp-defaults (dist_lm: the trainer's).
    p.add_argument("--ddp-defaults", choices=("trainer", "accelerate"), default="trainer",
                   help="dist_lm DDP settings before the knobs below: the trainer's (trainer.ddp_kwargs) or "
                        "Accelerate's; the HF anchor always gets Accelerate's")
    p.add_argument("--bucket-cap-mb", type=int, default=None,
                   help="DDP gradient bucket size (trainer: train.ddp_bucket_mb; Accelerate: 25)")
    p.add_argument("--gradient-as-bucket-view", action="store_true", help="DDP grads alias the buckets")
    p.add_argument("--static-graph", action="store_true", help="DDP static_graph=True")
    p.add_argument("--no-broadcast-buffers", action="store_true",
                   help="DDP broadcast_buffers=False (dist_lm's only buffers are the fixed RoPE tables)")
    p.add_argument("--grad-sync", choices=("ddp", "coalesced"), default="ddp",
                   help="dist_lm on several processes without FSDP: torch's DDP (the trainer's), or "
                        "dist_lm.parallel.grad_sync (no DDP module: the graph compiled in pieces of --bucket-cap-mb, "
                        "each group of gradients all-reduced in place as one coalesced call; experimental)")
    p.add_argument("--one-rank-group", action="store_true",
                   help="data parallelism in one process: join a process group of one rank (NCCL on CUDA) so that "
                        "the whole sync runs (DDP: its module, graph pieces, buckets, hook and all-reduces; "
                        "coalesced: split compile, hooks, all-reduces, embedding rows) with no peer to wait for; "
                        "against the plain 1-GPU row, what it costs in compute alone")
    p.add_argument("--dense-embedding", action="store_true",
                   help="--grad-sync coalesced: all-reduce the whole embedding gradient, not only the rows of the "
                        "tokens seen (replicate(sparse_embedding=False))")
    p.add_argument("--tokens", default="random",
                   help="random: uniform ids (the work does not depend on them; the worst case for the coalesced "
                        "sync's embedding rows), or a token-shard directory (dist_lm.data.prepare_shards) whose "
                        "train split gives each rank its own windows of real text")
    p.add_argument("--comm-hook", choices=("mean", "mean-bf16", "none", "bf16"), default="none",
                   help="DDP gradient comm hook: none (DDP's reducer divides each gradient as it copies it into "
                        "its bucket; the trainer's, the default), mean (parallel.mean_allreduce_hook: the mean "
                        "inside NCCL's all-reduce), mean-bf16 (the same, bf16 on the wire), bf16 (Accelerate's "
                        "DDPCommunicationHookType.BF16)")
    p.add_argument("--no-align-pieces", action="store_true",
                   help="dist_lm DDP: leave dynamo's first graph piece at 1 MiB instead of DDP's first bucket size "
                        "(parallel.align_compiled_pieces_with_buckets, which the trainer applies)")
    p.add_argument("--compile-after-ddp", action="store_true",
                   help="dist_lm DDP: wrap in DDP first, then torch.compile the wrapper (dynamo's DDPOptimizer "
                        "splits the graph at bucket boundaries), instead of DDP around the compiled model")
    p.add_argument("--ddp-optimizer", choices=("ddp_optimizer", "no_optimization"), default="ddp_optimizer",
                   help="torch._dynamo.config.optimize_ddp for DDP around a compiled model: ddp_optimizer (torch's "
                        "default) splits the compiled graph at bucket boundaries so all-reduces overlap the "
                        "backward; no_optimization keeps one graph and all-reduces after the backward")
    p.add_argument("--fsdp-unit", choices=FSDP_UNITS, default=TrainConfig.fsdp_unit,
                   help="dist_lm FSDP2: each block its own unit, runs of --fsdp-group-blocks blocks, or the whole "
                        "model one (train.fsdp_unit)")
    p.add_argument("--fsdp-group-blocks", type=int, default=TrainConfig.fsdp_group_blocks,
                   help="blocks per unit with --fsdp-unit group")
    p.add_argument("--fsdp-prefetch", action="store_true",
                   help="dist_lm FSDP2 block units: explicit next-block prefetch (FSDPOptions.explicit_prefetch)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps: GPU busy time, NCCL time and how much of it is exposed")
    p.add_argument("--trace-dir", default="",
                   help="with --profile: each rank also writes its Chrome trace of the profiled steps there "
                        "(<tag or shape>_<type>x<processes>_rank<N>.json.gz), for reading kernel by kernel offline")
    p.add_argument("--tag", default="", help="free text copied into the row (the driver's run label)")
    p.add_argument("--dry-run", action="store_true", help="tiny shape, 1 warm-up + 1 timed step, any device")
    args = p.parse_args(argv)
    if args.trace_dir and not args.profile:
        p.error("--trace-dir writes the traces of the profiled steps: add --profile")
    if args.dense_embedding and args.grad_sync != "coalesced":
        p.error("--dense-embedding is a setting of --grad-sync coalesced")
    if args.one_rank_group and (args.system != "dist_lm" or args.compile_after_ddp or args.grad_accum > 1):
        # one process: Accelerate neither wraps DDP nor skips its all-reduce during accumulation (no_sync)
        p.error("--one-rank-group measures dist_lm's own data-parallel setup at --grad-accum 1, without "
                "--compile-after-ddp")
    if not args.dry_run and args.shape not in SHAPES:
        p.error(f"--shape {args.shape!r} is unknown; choose from {list(SHAPES)}")
    if args.steps < 1 or args.warmup < 0 or args.grad_accum < 1 or args.batch < 0:
        p.error("--steps and --grad-accum must be >= 1, --warmup and --batch >= 0")
    if args.dry_run:
        args.steps, args.warmup = 1, 1
    if args.one_rank_group and args.comm_hook == "bf16":
        p.error("--one-rank-group: --comm-hook bf16 is Accelerate's own, registered by prepare(); use mean-bf16")
    return args


def batch_tokens(source: str, batch: int, cfg: ModelConfig, rank: int, seed: int) -> torch.Tensor:
    """(batch, seq_len + 1) token ids of this rank, different on every rank: uniform random ids (seed + rank), or
    `batch` consecutive windows of a token-shard directory's train split, rank r's starting at window r * batch
    (wrapping around a small split)."""
    if source == "random":
        gen = torch.Generator().manual_seed(seed + rank)
        return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    import numpy as np

    from dist_lm.data import ShardedTokens

    tokens = ShardedTokens.open(source, "train")
    windows = (len(tokens) - 1) // cfg.seq_len
    if windows < 1:
        raise SystemExit(f"--tokens {source}: fewer train tokens than one window of {cfg.seq_len + 1}")
    if (rank + 1) * batch > windows:
        print(f"warning: --tokens {source} holds {windows} windows of {cfg.seq_len + 1}, fewer than rank {rank}'s "
              f"last; its windows wrap around and repeat other ranks' text", file=sys.stderr)
    ids = (np.arange(batch) + rank * batch) % windows
    data = torch.from_numpy(tokens.read_rows(ids * cfg.seq_len, cfg.seq_len + 1)).long()
    if int(data.max()) >= cfg.vocab_size:
        raise SystemExit(f"--tokens {source}: token id {int(data.max())} is outside the shape's vocabulary of "
                         f"{cfg.vocab_size}")
    return data


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    ddp = {}
    if args.system == "dist_lm" and args.ddp_defaults == "trainer":  # what build_run hands to its Accelerator
        ddp.update(ddp_kwargs(RunConfig()).to_kwargs())  # what it sets apart from DDP's defaults
    if args.bucket_cap_mb is not None:
        ddp["bucket_cap_mb"] = args.bucket_cap_mb
    if args.gradient_as_bucket_view:
        ddp["gradient_as_bucket_view"] = True
    if args.static_graph:
        ddp["static_graph"] = True
    if args.comm_hook == "bf16":
        from accelerate.utils import DDPCommunicationHookType

        ddp["comm_hook"] = DDPCommunicationHookType.BF16
    return Accelerator(
        # As the trainer: without CUDA, force the CPU so Accelerate joins the torchrun processes over gloo.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum,
                                                                sync_with_dataloader=False),
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp)] if ddp else None,
    )


def build_dist_lm(args, accelerator, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor):
    """(step function, raw model, how it was compiled, extra row fields) built the way build_run builds it."""
    run_cfg = RunConfig(model=cfg)
    run_cfg.train.compile = not args.no_compile
    run_cfg.train.compile_mode = args.compile_mode
    run_cfg.train.batch_size, run_cfg.train.grad_accum_steps = x.shape[0], args.grad_accum
    raw = TransformerLM(cfg)
    fsdp = fsdp_options(accelerator, unit=args.fsdp_unit, group_blocks=args.fsdp_group_blocks)
    if fsdp is not None and args.fsdp_prefetch:
        fsdp = dataclasses.replace(fsdp, explicit_prefetch=True)
    after_ddp = args.compile_after_ddp and fsdp is None and not args.no_compile
    torch._dynamo.config.optimize_ddp = args.ddp_optimizer
    if after_ddp:
        run_cfg.train.compile = False  # compiled below, around the DDP wrapper
    averager = None
    if args.grad_sync == "coalesced" and fsdp is None and (accelerator.num_processes > 1 or args.one_rank_group):
        model, averager = _coalesced_data_parallel(args, accelerator, raw, run_cfg)
    else:
        model = apply_parallelism(raw, run_cfg, fsdp=fsdp)
    # After sharding: under FSDP2 the optimizer must hold the DTensor parameters (as in build_run).
    optimizer = AdamW(param_groups(raw, WEIGHT_DECAY), **HYPER, fused=None)
    note = ""
    # DDP's graph pieces aligned with its buckets only where it is given a bucket size (the trainer's settings or
    # --bucket-cap-mb); with Accelerate's defaults DDP keeps PyTorch's first bucket, and so does dynamo.
    explicit = args.ddp_defaults == "trainer" or args.bucket_cap_mb is not None
    align = explicit and not args.no_compile and not args.no_align_pieces
    align_bucket_mb = accelerator.ddp_handler.bucket_cap_mb if align else None
    if averager is not None:  # no DDP module: Accelerate only wraps the optimizer
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    elif args.one_rank_group:  # Accelerate wraps no DDP module around one process: as prepare() would
        model = _one_rank_ddp(args, accelerator, model, align_bucket_mb)
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    elif fsdp is None:
        model, optimizer = prepare_data_parallel(accelerator, model, optimizer, **_hook(args),
                                                 align_bucket_mb=align_bucket_mb)
    else:  # what build_run does: Accelerate's prepare() refuses an FSDP2 optimizer without its model
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    if after_ddp:
        model = torch.compile(model)
    how = "model after DDP" if after_ddp else compiled_as(run_cfg, fsdp, accelerator.device)
    device = accelerator.device
    host_x, host_y = x.cpu(), y.cpu()
    lr = HYPER["lr"]

    extra = {"note": note, "ddp_seen": _ddp_settings(model)}  # filled in further by the steps (grad_sync)
    if averager is not None:
        extra["grad_sync"] = {"kind": "coalesced", "bucket_mb": averager.bucket_bytes / 2**20}

    # Without a prepared model (grad_sync, one rank), the autocast that prepare(model) adds to the forward elsewhere.
    prepared = averager is None and not args.one_rank_group
    forward_context = contextlib.nullcontext if prepared else accelerator.autocast

    # The trainer's optimizer_step (dist_lm/train/trainer.py) with the benchmark's knobs; it needs a whole Run.
    graphs = cuda_graphs(run_cfg, accelerator.device, fsdp)

    def step() -> torch.Tensor:
        if graphs:  # as the trainer: a new iteration of inductor's CUDA graph trees, once per optimizer step
            torch.compiler.cudagraph_mark_step_begin()
        for group in optimizer.param_groups:
            group["lr"] = lr  # the trainer sets the scheduled lr each step; a constant here
        model.train()
        step_loss = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            xb, yb = (to_device(host_x, device), to_device(host_y, device)) if args.h2d else (x, y)
            with accelerator.accumulate(model):
                if averager is not None:
                    averager.enabled = accelerator.sync_gradients  # all-reduce in this backward or not
                    averager.note_tokens(host_x)  # the embedding rows to all-reduce (as the trainer)
                with forward_context():
                    loss = model(xb, yb)
                accelerator.backward(loss)
                step_loss += loss.detach()
                if accelerator.sync_gradients:
                    if averager is not None:
                        averager.wait()
                        # the row says how the gradients went: one all-reduce per compiled piece, or in bytes
                        extra["grad_sync"]["all_reduces_per_step"] = len(averager.launched)
                        extra["grad_sync"]["by_piece"] = averager.grouped_by_pieces
                        extra["grad_sync"]["embedding_rows"] = averager.embedding_rows
                    accelerator.unscale_gradients()
                    if not args.no_clip:
                        clip_grad_norm(model.parameters(), GRAD_CLIP)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        return step_loss / args.grad_accum

    return step, raw, how, extra


def _coalesced_data_parallel(args, accelerator, raw: torch.nn.Module, run_cfg: RunConfig):
    """(model to call, GradientAverager): what the trainer builds with train.grad_sync=coalesced
    (dist_lm.parallel.grad_sync.replicate), with the bucket size DDP would get here."""
    ddp_only = [flag for flag, on in (("--compile-after-ddp", args.compile_after_ddp),
                                      ("--static-graph", args.static_graph),
                                      ("--comm-hook", args.comm_hook != "none"),
                                      ("--ddp-optimizer", args.ddp_optimizer != "ddp_optimizer")) if on]
    if ddp_only:
        raise SystemExit(f"--grad-sync coalesced has no DDP module: {', '.join(ddp_only)} would be ignored")
    # the bucket size DDP would get: --bucket-cap-mb, else the trainer's, or PyTorch's 25 with Accelerate's defaults
    bucket_mb = args.bucket_cap_mb or (25 if args.ddp_defaults == "accelerate" else run_cfg.train.ddp_bucket_mb)
    return replicate(raw, run_cfg, accelerator.device, bucket_mb=bucket_mb, sparse_embedding=not args.dense_embedding)


def _one_rank_ddp(args: argparse.Namespace, accelerator, model: torch.nn.Module,
                  align_bucket_mb: float | None) -> torch.nn.Module:
    """DDP around `model` on the one-rank group (--one-rank-group), set up as prepare_data_parallel does on several
    processes: the DDP settings Accelerate would pass, the compiled pieces aligned with buckets of
    `align_bucket_mb` (None: left to torch), then trainer.configure_ddp."""
    from torch.nn.parallel import DistributedDataParallel

    if align_bucket_mb is not None:
        align_compiled_pieces_with_buckets(align_bucket_mb)
    kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
    cuda = accelerator.device.type == "cuda"
    model = DistributedDataParallel(model.to(accelerator.device),  # prepare() would have moved it
                                    device_ids=[torch.cuda.current_device()] if cuda else None, **kwargs)
    configure_ddp(model, **_hook(args))
    return model


def _join_one_rank_group(accelerator) -> None:
    """A process group of this process alone (--one-rank-group), for the coalesced sync's collectives."""
    import torch.distributed as dist

    if accelerator.num_processes != 1 or dist.is_initialized():
        raise SystemExit("--one-rank-group runs in one process that no launcher has put in a process group")
    cuda = accelerator.device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)


def build_hf(args, accelerator, cfg: ModelConfig, x: torch.Tensor):
    """(step function, module, how it was compiled, extra row fields): LlamaForCausalLM through Accelerate."""
    from accelerate.utils import DistributedType

    model = _hf_model(cfg).train()
    compiled_by_us = not args.no_compile and args.hf_compile == "before-prepare"
    if compiled_by_us:
        model = torch.compile(model)
    # Parameters still on the CPU: Accelerate moves them (DDP) or swaps in the shards (FSDP2) during prepare.
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER, weight_decay=WEIGHT_DECAY,
                                  fused=torch.cuda.is_available())
    # Accelerate's defaults: DDP's own averaging unless --comm-hook asks for the mean hook (plain prepare under FSDP)
    model, optimizer = prepare_data_parallel(accelerator, model, optimizer, align_bucket_mb=None, **_hook(args))
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    how = "eager" if args.no_compile else ("before prepare" if compiled_by_us else "accelerate dynamo config")

    def step() -> torch.Tensor:
        model.train()
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(args.grad_accum):
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss  # HF shifts the labels inside
                accelerator.backward(loss)
                step_loss += loss.detach()
                if accelerator.sync_gradients:
                    if not args.no_clip:
                        accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        return step_loss / args.grad_accum

    return step, model, how + (" (FSDP2 plugin)" if fsdp else ""), {"note": "", "ddp_seen": _ddp_settings(model)}


def _hook(args: argparse.Namespace) -> dict:
    """prepare_data_parallel's arguments for --comm-hook (bf16 goes through Accelerate's own hook instead) and
    --no-broadcast-buffers."""
    return {"mean_hook": args.comm_hook.startswith("mean"),
            "wire_dtype": torch.bfloat16 if args.comm_hook == "mean-bf16" else None,
            # the trainer turns DDP's buffer broadcast off; Accelerate's defaults keep it unless asked
            "sync_buffers": (args.system != "dist_lm" or args.ddp_defaults == "accelerate")
            and not args.no_broadcast_buffers}


def _ddp_settings(model: torch.nn.Module) -> dict | None:
    """What the DDP wrapper actually got (to confirm the knobs reached it); None when not DDP."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    return {"bucket_cap_mb": model.bucket_bytes_cap / 2**20, "gradient_as_bucket_view": model.gradient_as_bucket_view,
            "static_graph": model.static_graph, "broadcast_buffers": model.broadcast_buffers,
            "comm_hooks": [hook.__name__ for hook, _ in getattr(model, "_comm_hooks", [])],
            # what dynamo's DDPOptimizer will size its first graph piece by
            "first_piece_MiB": torch.distributed._DEFAULT_FIRST_BUCKET_BYTES / 2**20}


def timed(step: Callable[[], torch.Tensor], accelerator, warmup: int, steps: int) -> tuple[float, list[float], float]:
    """(warm-up seconds, seconds per step in each timed window, last loss) on this rank.

    The timed steps are split into bench_train.window_sizes windows, each started together on all ranks and
    closed with a device sync: the lent machines showed one-off stalls of tens of ms (host or
    peer), which a single mean over 10 steps turned into a 20-30% swing between calls; the median window is
    robust to one of them."""
    device = accelerator.device
    accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync_device(device)
    warmup_s = time.perf_counter() - t0
    per_step = []
    for size in window_sizes(steps):
        accelerator.wait_for_everyone()  # start each window together: a late rank would stall the others
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(size):
            loss = step()
        sync_device(device)
        per_step.append((time.perf_counter() - t0) / size)
    return warmup_s, per_step, float(loss)  # the one host read, after the clock stopped


def main(argv: list[str] | None = None) -> None:
    from accelerate.utils import gather_object, set_seed

    args = parse_args(argv)
    accelerator = make_accelerator(args)
    device = accelerator.device
    if args.one_rank_group:
        _join_one_rank_group(accelerator)
    kwargs, batch = DRY_RUN_SHAPE if args.dry_run else SHAPES[args.shape]
    batch = args.batch or batch
    cfg = ModelConfig(**kwargs, attention_backend="auto", fused_loss=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokens = batch_tokens(args.tokens, batch, cfg, accelerator.process_index, args.seed).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    set_seed(args.seed)
    if args.system == "dist_lm":
        step, model, how, extra = build_dist_lm(args, accelerator, cfg, x, y)
    else:
        step, model, how, extra = build_hf(args, accelerator, cfg, x)
    warmup_s, windows_s, loss = timed(step, accelerator, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    trace = None
    if args.trace_dir:
        label = "".join(c if c.isalnum() else "_" for c in (args.tag or args.shape))
        topology = f"{accelerator.distributed_type.value.lower()}x{accelerator.num_processes}"
        trace = Path(args.trace_dir) / f"{label}_{topology}_rank{accelerator.process_index}.json.gz"
    profile = profile_summary(step, device, trace=trace) if args.profile else None

    mine = {"rank": accelerator.process_index, "windows_s": windows_s, "warmup_s": warmup_s, "peak_mem_GiB": peak,
            "loss": loss, "profile": profile}
    ranks = gather_object([mine])
    if accelerator.is_main_process:
        # Per window the slowest rank (data-parallel ranks wait for each other), then the median window.
        windows = [max(r["windows_s"][i] for r in ranks) for i in range(len(windows_s))]
        slowest = statistics.median(windows)
        tokens_per_gpu = batch * args.grad_accum * cfg.seq_len
        tps = tokens_per_gpu / slowest
        losses = [r["loss"] for r in ranks]
        row = {
            "system": args.system, "shape": "dry-run" if args.dry_run else args.shape,
            "num_gpus": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "compiled": not args.no_compile, "compile": how, "batch_per_gpu": batch, "grad_accum": args.grad_accum,
            "seq_len": cfg.seq_len, "steps": args.steps, "warmup": args.warmup,
            "step_ms": 1e3 * slowest, "step_ms_windows": [1e3 * w for w in windows], "tokens_per_s_per_gpu": tps,
            "mfu": tps * flops_per_token(cfg) / PEAK_FLOPS if device.type == "cuda" else None,
            "peak_mem_GiB": None if peak is None else max(r["peak_mem_GiB"] for r in ranks),
            "warmup_s": max(r["warmup_s"] for r in ranks), "loss": losses[0],
            "per_rank": ranks, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,  # DTensor.numel() is the global size
            "ddp_kwargs": {"bucket_cap_mb": args.bucket_cap_mb, "gradient_as_bucket_view": args.gradient_as_bucket_view,
                           "static_graph": args.static_graph, "broadcast_buffers": not args.no_broadcast_buffers,
                           "comm_hook": args.comm_hook},
            "clip": not args.no_clip, "h2d": args.h2d, "tag": args.tag, **extra,
        }
        if args.profile:  # every rank's: a rank whose GPU waits on NCCL may be waiting for a slower peer
            row["profile"] = ranks[0]["profile"]
            row["profile_ranks"] = [r["profile"] for r in ranks]
        if not all(math.isfinite(v) for v in losses):
            row["error"] = f"non-finite loss {losses}"
        print(ROW_PREFIX + json.dumps(row), flush=True)
    # Release what holds the process group (the DDP module or averager in the step's closure, Accelerate's
    # references) before end_training destroys it, as the trainer does: freed later, during interpreter exit, the
    # gloo group now and then aborted a finished CPU run ("terminate called without an active exception", exit 1
    # after the row: 2 of 60 two-process dry runs before, 0 of 160 after, on a 2-core VM).
    del step, model
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.one_rank_group and torch.distributed.is_initialized():  # the group Accelerate did not make
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

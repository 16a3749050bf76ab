"""torch.compile of the single-device model, at one of three granularities (train.compile_mode).

Design decisions:
- "model" compiles the whole forward, loss included, as one graph, so inductor also fuses the chunked
  cross-entropy's elementwise work (dist_lm.kernels.cross_entropy) and the embedding/final-norm glue.
- "cudagraphs" (the default) is that graph replayed as CUDA graphs: the host launches one graph instead of hundreds
  of kernels (each Triton attention call alone costs tens of microseconds of Python), which measured +8% at the
  124M shape on one H200 (same machine, same call), and took the seed model at batch 32, where the GPU otherwise
  waits for the host, from 0.78x to 1.45x HF compiled (benchmarks/README.md).
- "blocks" compiles each TransformerBlock in place (module.compile()): one graph reused by all blocks (same code,
  same shapes: one compile, not num_layers), so compile time stops growing with depth, and a graph break in the
  head cannot split a block; the loss then runs eagerly with its own compiled elementwise helper.
  benchmarks/bench_train.py --compile-mode measures the modes.
- Under FSDP2 the granularity follows the unit instead (dist_lm.parallel.apply, `compiled_as`): per block before
  sharding for block and group units (torchtitan's recipe: dynamo cannot trace FSDP2's hooks, and per-block
  graphs keep each block's all-gather outside them), the whole forward after sharding for one unit (never as
  CUDA graphs, whose fixed addresses the re-gathered weights do not keep).
"""

from __future__ import annotations

import typing

import torch

from dist_lm.config import CompileMode, RunConfig
from dist_lm.errors import UserError

if typing.TYPE_CHECKING:
    from dist_lm.parallel.fsdp import FSDPOptions

COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)


def apply_compile(model: torch.nn.Module, mode: CompileMode = "model") -> torch.nn.Module:
    """Compile the whole model (returns a wrapper sharing its parameters) or each block in place.

    "cudagraphs" is the whole model with inductor's CUDA graphs (torch.compile mode="reduce-overhead"): the
    forward and backward replay as graphs, without per-kernel host launches (the trainer's default). Callers call
    torch.compiler.cudagraph_mark_step_begin() once per optimizer step, not per micro-step: the gradients of
    an accumulation's first micro-step live in the graphs' memory, and a new step would let the next replay
    overwrite them; inside one step the graph trees see them alive and record a second path instead. The
    graphs' outputs (the loss) are overwritten at the next step too: keep a copy (`loss.detach()` into a sum),
    never the tensor. On the CPU, inductor skips the graphs and it is the "model" mode."""
    if mode == "model":
        return torch.compile(model)
    if mode == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    if mode == "blocks":
        for block in model.blocks:
            block.compile()
        return model
    raise UserError(f"compile mode {mode!r} is unknown; use one of {COMPILE_MODES}")


def compiled_as(cfg: RunConfig, fsdp: FSDPOptions | None, device: torch.device) -> str:
    """How apply_parallelism compiles under this topology: eager, model, blocks or cudagraphs (for the start line,
    the loop's step marks and the benchmarks' rows)."""
    if not cfg.train.compile:
        return "eager"
    if fsdp is not None:
        return "model" if fsdp.unit == "model" else "blocks"
    if cfg.train.compile_mode == "cudagraphs" and device.type != "cuda":
        return "model"  # inductor makes no CUDA graphs without CUDA
    return cfg.train.compile_mode


def cuda_graphs(cfg: RunConfig, device: torch.device, fsdp: FSDPOptions | None) -> bool:
    """Whether the compiled step replays as CUDA graphs (so the loop must mark each step's start)."""
    return compiled_as(cfg, fsdp, device) == "cudagraphs"

"""One rank of the DDP graph-piece test (tests/integration/test_ddp_setup.py), started by torchrun over gloo.

usage: torchrun --nproc_per_node 2 ddp_pieces_worker.py OUT_DIR BUCKET_MB ALIGN   (ALIGN: 1 | 0)

A compiled TransformerLM under DDP as the trainer wraps it (buckets of BUCKET_MB, gradients as bucket views, the
mean hook, parallel.align_compiled_pieces_with_buckets when ALIGN is 1), three steps; rank 0 writes the
parameters of each graph piece dynamo's DDPOptimizer cut and of each DDP bucket after DDP
rebuilt them, both in backward order (the LM head's side first), with every parameter's size in bytes.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.backends import distributed as dynamo_ddp
from torch.nn.parallel import DistributedDataParallel

from dist_lm.config import ModelConfig
from dist_lm.model import TransformerLM
from dist_lm.parallel import align_compiled_pieces_with_buckets, configure_ddp

# 8 blocks of ~0.8 MiB between a 4 MiB embedding and a 4 MiB head (fp32): several pieces at a few MiB a bucket.
CFG = ModelConfig(vocab_size=8192, seq_len=32, d_model=128, num_layers=8, num_heads=4)


def _param_name(graph_name: str) -> str:
    """dynamo's placeholder name (L_self_modules_blocks_modules_0_..._parameters_weight_) -> blocks.0....weight"""
    name = graph_name.removeprefix("L_self_").removeprefix("modules_").rstrip("_")
    return name.replace("_modules_", ".").replace("_parameters_", ".")


def main() -> None:
    out, bucket_mb, align = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
    dist.init_process_group("gloo")
    pieces: list[list[str]] = []
    # Observe the split: dynamo passes its pieces (forward order: the embedding's side first) to this printer.
    dynamo_ddp.pretty_print_buckets = lambda buckets, cap: pieces.extend(
        [_param_name(n) for n in b.params] for b in reversed(buckets))
    torch.manual_seed(0)
    model = TransformerLM(CFG)
    names = {p: n for n, p in model.named_parameters()}
    if align:  # as the trainer: before DDP is built
        align_compiled_pieces_with_buckets(bucket_mb)
    ddp = DistributedDataParallel(torch.compile(model), bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
    configure_ddp(ddp)  # as the trainer, after DDP is built
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(3):  # DDP rebuilds its buckets after the first step, in the order the gradients arrived
        ddp(x, x).backward()
    buckets = [[names[p] for p in b.parameters()] for b in ddp.reducer._get_zeros_like_grad_buckets()]
    if dist.get_rank() == 0:
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        (out / "pieces.json").write_text(json.dumps({"pieces": pieces, "buckets": buckets, "bytes": sizes}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as fsdp_worker: gloo's teardown can abort the process after the results are written


if __name__ == "__main__":
    main()

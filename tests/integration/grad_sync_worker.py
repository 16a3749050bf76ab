"""One rank of the gradient-averager test (tests/integration/test_grad_sync.py), started by torchrun over gloo.

usage: torchrun --nproc_per_node N grad_sync_worker.py OUT_DIR {eager,split} [sparse] [mixed]

Each rank starts from its own random weights (rank 0's are broadcast), then runs one optimizer step's worth of
backward: two micro-steps on token ids that differ by rank and step, gradients synchronised on the second only.
With "sparse" the embedding's gradient is all-reduced as the rows looked up (the averager's token_embedding).
With "mixed" the last layer is float64, so that one group holds gradients of two dtypes.
With "split" the model is compiled cut into pieces (dist_lm.parallel.grad_sync.split_compile) with AOT autograd
and no code generation (so that the backward runs piece by piece, as inductor's would, without a C++ compiler),
and the averager groups the gradients by those pieces. Every rank writes its weights, gradients, the pieces and
the sizes of the all-reduces it started, before and after the backward ended.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from dist_lm.parallel.grad_sync import GradientAverager, broadcast_parameters, split_compile

BUCKET_MB = 1100 / 2**20  # a 16x16 fp32 weight is 1024 bytes: about one Linear layer per piece
VOCAB = 64  # embedding rows; the batches use only the first half, so some rows get no gradient anywhere


class TinyLM(torch.nn.Module):
    """Token ids -> embedding (rows looked up, mean over positions) -> 4 tanh layers -> 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, 16)
        layers = []
        for _ in range(4):
            layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
        self.layers = torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.layers[:-1](self.embed_tokens(ids).mean(dim=1))
        last = self.layers[-1]
        return last(hidden.to(last.weight.dtype)).float()


def model(seed: int = 0, mixed: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = TinyLM()
    if mixed:
        module.layers[-1].double()
    return module


def batch(rank: int, micro_step: int) -> torch.Tensor:
    """Token ids (5 sequences of 3), different per rank and micro-step."""
    return torch.randint(0, VOCAB // 2, (5, 3), generator=torch.Generator().manual_seed(100 * micro_step + rank))


def main() -> None:
    out, how, options = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3:])
    sparse, mixed = "sparse" in options, "mixed" in options
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    module = model(seed=rank, mixed=mixed)  # different on every rank until the broadcast
    broadcast_parameters(module)
    run, pieces = module, None
    if how == "split":
        no_codegen = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward))
        compiled = split_compile(module, bucket_mb=BUCKET_MB, backend=no_codegen)
        run, pieces = compiled.module, compiled.pieces
    averager = GradientAverager(module.parameters(), bucket_mb=BUCKET_MB, pieces=pieces,
                                token_embedding=module.embed_tokens.weight if sparse else None)
    for micro_step in range(2):
        averager.enabled = micro_step == 1
        ids = batch(rank, micro_step)
        averager.note_tokens(ids)
        run(ids).square().sum().backward()
    started_in_backward = list(averager.launched)
    averager.wait()
    names = {id(p): n for n, p in module.named_parameters()}
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "launched": averager.launched, "started_in_backward": started_in_backward,
        "embedding_rows": averager.embedding_rows,
        "pieces": [[names[id(p)] for p in piece] for piece in (pieces() if pieces else [])],
        "weights": {n: p.tolist() for n, p in module.named_parameters()},
        "grads": {n: p.grad.tolist() for n, p in module.named_parameters()}}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the other gloo workers: no C++ teardown, where gloo's threads can abort the process


if __name__ == "__main__":
    main()

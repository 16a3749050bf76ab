"""Data-parallel gradient averaging without DistributedDataParallel's buckets (experimental: train.grad_sync).

Why: torch's DDP reducer copies every gradient the backward produces into a flat bucket before all-reducing
it, because a compiled backward's outputs are never views of its buckets: 114 copies a step at the 124M shape,
0.43 ms of copy kernels and 0.15 ms of gaps on an H200 (benchmarks/README.md, Scaling), a third of what DDP
costs there over one GPU. `GradientAverager` all-reduces the gradients where the backward left them: a
post-accumulate hook on every parameter marks its gradient ready, and when every gradient of a group is ready
the group goes to the backend as one coalesced call (one ncclGroupStart/End over its tensors, no flat copy), the
mean taken inside the reduction (ReduceOp.AVG). On gloo (the CPU), which has no AVG, the group is copied into flat
tensors (one per device and dtype), divided, all-reduced and copied back, as DDP's buckets are.
For the all-reduces to overlap the backward, the compiled graph must be cut into pieces whose backward ends
early: `split_compile` cuts it as DDP's dynamo optimizer does, by parameter bytes, without a DDP module, and
`SplitCompiled.pieces()` gives those pieces as the averager's groups, so that each group is all-reduced as soon
as its piece's backward has produced it. Without pieces (an eager model) the groups are formed in the order the
gradients arrive, closed at `bucket_mb`.

The trainer runs it with train.grad_sync=coalesced (experimental; `replicate` builds it the way it builds the
other topologies), and `benchmarks/bench_scaling.py --grad-sync coalesced` measures it against DDP. Like DDP,
`replicate` broadcasts rank 0's weights first. Unlike DDP, it does not find unused parameters: every parameter
must get a gradient in each synchronised backward (`wait` says which did not). The all-reduces are issued from
the backward's hooks (the autograd engine's thread on CUDA) inside torch.distributed's coalescing manager, whose
state is per process group, not per thread: nothing else may issue collectives on the same group during a
synchronised backward.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from dist_lm.config import RunConfig
from dist_lm.parallel.activation_checkpointing import apply_activation_checkpointing
from dist_lm.parallel.compile import apply_compile


class GradientAverager:
    """Averages the gradients of `parameters` over `group` during the backward (see the module docstring).

    Use: `averager.enabled = True` before the backward of a micro-step whose gradients are to be synchronised
    (the last of an accumulation), `averager.wait()` after it and before reading the gradients (clipping, the
    optimizer); with enabled False the backward only accumulates locally. `pieces` (called at the first
    synchronised gradient, once the model has been compiled): the parameter groups to all-reduce together, the
    same on every rank (e.g. SplitCompiled.pieces); None or an empty answer: groups of `bucket_mb` in order of
    arrival.

    `token_embedding`: the weight of an embedding looked up by the token ids and used nowhere else. Its gradient
    is zero outside the rows of the tokens seen, so only the rows some rank saw since the last synchronisation are
    all-reduced (gathered into one compact tensor and scattered back), which makes the all-reduce that the end of
    the backward waits for (the embedding's gradient is the last one produced) several times smaller on text. It
    needs every micro-step's token ids, on the host, through `note_tokens` on every rank (after `enabled` is set);
    the ranks agree on the rows over `host_group` (a gloo group: a mask of one byte per row, whose reduction
    starts in the synchronised micro-step's note_tokens and is waited for when the embedding's gradient is ready).
    When more than DENSE_FRACTION of the rows were seen, the whole gradient goes instead (the gather and scatter
    would cost more than the rows saved)."""

    DENSE_FRACTION = 0.9

    def __init__(self, parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None,
                 bucket_mb: float = 125.0,
                 pieces: Callable[[], list[list[torch.nn.Parameter]] | None] | None = None,
                 token_embedding: torch.nn.Parameter | None = None,
                 host_group: dist.ProcessGroup | None = None) -> None:
        self.params = [p for p in parameters if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group)
        # "nccl", or a per-device list such as "cpu:gloo,cuda:nccl" (CUDA gradients then go to NCCL)
        self.nccl = "nccl" in str(dist.get_backend(group))
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.enabled = False
        self.launched: list[int] = []  # tensors per group all-reduced in the last synchronised backward (for tests)
        self.embedding_rows: int | None = None  # embedding rows all-reduced last time (None: the whole gradient)
        self._pieces = pieces
        self._group_of: dict[int, int] | None = None  # id(param) -> index into _groups, once the pieces are known
        self._groups: list[list[torch.nn.Parameter]] = []
        self._waiting: list[int] = []  # per group, gradients not ready yet
        self._pending: list[torch.nn.Parameter] = []  # arrival-order grouping (no pieces)
        self._pending_bytes = 0
        self._ready: set[int] = set()
        self._works: list = []
        self._flat: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # gloo: (flat mean, gradients it came from)
        self._embedding = token_embedding
        self._host_group = host_group if host_group is not None else group
        self._seen: torch.Tensor | None = None  # host mask of the embedding rows looked up since the last sync
        self._seen_work = None  # the mask's reduction over the host group, started by a synchronised note_tokens
        self._scatter: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (gradient, rows, compact)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]

    @property
    def grouped_by_pieces(self) -> bool:
        """Whether the gradients go by compiled piece (else in bytes, in order of arrival)."""
        return self._group_of is not None

    def note_tokens(self, token_ids: torch.Tensor) -> None:
        """Record the token ids of a micro-step (a host tensor: reading a device one would wait for the GPU)."""
        if self._embedding is None:
            return
        if token_ids.device.type != "cpu":
            raise ValueError("note_tokens takes the token ids on the host (reading them from the device would make "
                             "the host wait for the GPU); pass the batch before it is copied to the device")
        if self._seen_work is not None:
            raise RuntimeError("note_tokens called again after a synchronised micro-step's; call wait() first")
        if self._seen is None:
            self._seen = torch.zeros(self._embedding.shape[0], dtype=torch.uint8)
        self._seen[token_ids.reshape(-1)] = 1
        if self.enabled:  # the last micro-step before the sync: the ranks' masks travel while the GPU computes
            self._seen_work = dist.all_reduce(self._seen, op=dist.ReduceOp.MAX, group=self._host_group,
                                              async_op=True)

    def _resolve_pieces(self) -> None:
        """Group by the compiled pieces from the first synchronised backward on (the model is compiled by then);
        fall back to arrival order, for good, when they do not cover the parameters once each."""
        if self._group_of is not None or self._pieces is None:
            return
        mine = {id(p) for p in self.params}
        groups = [g for g in ([p for p in piece if id(p) in mine] for piece in (self._pieces() or [])) if g]
        if groups and {id(p) for g in groups for p in g} == mine and sum(map(len, groups)) == len(mine):
            self._groups = groups
            self._group_of = {id(p): i for i, g in enumerate(groups) for p in g}
        else:
            warnings.warn("the compiled pieces do not cover the parameters once each; grouping the gradients "
                          "in the order they arrive instead", RuntimeWarning, stacklevel=3)
            self._pieces = None

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        if id(param) in self._ready:
            raise RuntimeError("a parameter received two gradients in one synchronised backward (a module used "
                               "twice, or a second backward before wait()): the all-reduce already started")
        if not self._ready:  # the first gradient of this synchronised backward
            self.launched = []
            self.embedding_rows = None
            self._resolve_pieces()
            self._waiting = [len(g) for g in self._groups]
        self._ready.add(id(param))
        if self._group_of is not None:
            index = self._group_of[id(param)]
            self._waiting[index] -= 1
            if self._waiting[index] == 0:
                self._all_reduce(self._groups[index])
            return
        self._pending.append(param)
        self._pending_bytes += param.grad.numel() * param.grad.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self._all_reduce(self._pending)
            self._pending, self._pending_bytes = [], 0

    def _embedding_rows(self, device: torch.device) -> torch.Tensor | None:
        """The embedding rows any rank looked up since the last synchronisation, on `device` (agreed over the host
        group: the masks' maximum), or None when so many that the whole gradient should go (the same on every
        rank)."""
        if self._seen is None:  # every rank must take the same path, or the collectives below would not match
            raise RuntimeError("GradientAverager has a token_embedding but note_tokens was not called since the last "
                               "synchronisation; pass every micro-step's token ids to note_tokens")
        if self._seen_work is None:  # `enabled` was set after the last note_tokens: reduce now
            self._seen_work = dist.all_reduce(self._seen, op=dist.ReduceOp.MAX, group=self._host_group,
                                              async_op=True)
        self._seen_work.wait()
        rows = self._seen.nonzero().flatten()
        if len(rows) > self.DENSE_FRACTION * len(self._seen):
            return None
        self.embedding_rows = len(rows)
        if device.type == "cuda":  # pinned, so that the copy does not make the host wait
            return rows.pin_memory().to(device, non_blocking=True)
        return rows.to(device)

    def _all_reduce(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce the gradients of `params` to their mean, started now and waited for in wait(): one coalesced
        call on NCCL, one flat tensor per device and dtype elsewhere; the token embedding's gradient as its
        looked-up rows only."""
        if not params:
            return
        grads = []
        for param in params:
            rows = self._embedding_rows(param.grad.device) if param is self._embedding else None
            if rows is not None:
                compact = param.grad.index_select(0, rows)
                self._scatter.append((param.grad, rows, compact))
                grads.append(compact)
            else:
                grads.append(param.grad)
        self.launched.append(len(grads))
        if self.nccl and grads[0].is_cuda:  # one ncclGroupStart/End over the tensors, the mean taken inside
            with dist._coalescing_manager(group=self.group, async_ops=True) as coalesced:
                for grad in grads:
                    dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.group)
            self._works.extend(coalesced.works)
            return
        # Elsewhere (gloo) one flat copy per device and dtype, divided and all-reduced, copied back in wait().
        # Why not the coalescing manager: over gloo, on the dev VM (2 cores, a one-rank group, 2 OpenMP threads),
        # it made the whole process 2x slower (forward and optimizer included: 69 ms a step against 30 with this,
        # a 2.7M-parameter model, eager), as if a thread of its own competed for the cores; with one OpenMP thread
        # both ran at the same speed. A flat tensor is also what DDP's buckets send over gloo.
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for same_kind in by_kind.values():
            flat = torch.cat([grad.reshape(-1) for grad in same_kind]).div_(self.world)
            self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))
            self._flat.append((flat, same_kind))

    def wait(self) -> None:
        """Start the all-reduce of the gradients still pending and wait (on the current stream) for all of them."""
        try:
            missing = [i for i, p in enumerate(self.params) if id(p) not in self._ready]
            if missing:
                raise RuntimeError(f"{len(missing)} parameter(s) got no gradient in this synchronised backward "
                                   f"(e.g. index {missing[0]}); GradientAverager needs every parameter to take part")
            self._all_reduce(self._pending)
            for work in self._works:
                work.wait()
            for flat, grads in self._flat:  # gloo: the means back where the backward left the gradients
                for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
                    grad.copy_(mean.view_as(grad))
            for grad, rows, compact in self._scatter:  # the averaged rows back; the others are zero on every rank
                grad.index_copy_(0, rows, compact)
        finally:  # a failed step leaves nothing behind for the next one
            self._works.clear()
            self._flat.clear()
            self._scatter.clear()
            self._ready.clear()
            self._pending, self._pending_bytes = [], 0
            self._seen, self._seen_work = None, None

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self._handles:
            handle.remove()


def broadcast_parameters(module: torch.nn.Module, group: dist.ProcessGroup | None = None, src: int = 0) -> None:
    """Give every rank rank `src`'s weights and buffers (what DDP does when it wraps a module)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=dist.get_global_rank(group, src) if group is not None else src, group=group)


class SplitCompiled:
    """What `split_compile` returns: the compiled module (`.module`, called like the model) and the pieces its
    graph was cut into (`.pieces()`, after the first call has compiled it)."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, splitter) -> None:
        self.model, self.module, self._splitter = model, module, splitter

    def pieces(self) -> list[list[torch.nn.Parameter]] | None:
        """The model's parameters grouped as the compiled pieces hold them (None before the first compile, or when
        the splitter's names cannot be matched to the model's parameters one to one)."""
        buckets = getattr(self._splitter, "buckets", None)
        if not buckets:
            return None
        by_name: dict[str, torch.nn.Parameter] = {}
        for name, param in self.model.named_parameters():
            key = _normalized(name)
            if key in by_name:
                return None
            by_name[key] = param
        pieces = []
        for bucket in buckets:
            piece = [by_name.get(_normalized(name)) for name in bucket.params]
            if any(p is None for p in piece):
                return None
            pieces.append(piece)
        return pieces


def _normalized(name: str) -> str:
    """A parameter's name as both the model ("blocks.1.attn.q_proj.weight") and dynamo's graph
    ("L_fn_modules_blocks_modules_1_modules_attn_modules_q_proj_parameters_weight_", with "self" for "fn" in other
    versions, or "L__self___blocks_1_attn_q_proj_weight") spell it, reduced to the same letters and digits."""
    tokens = [t for t in re.split(r"[^0-9A-Za-z]+", name) if t]
    if tokens and tokens[0] == "L":  # dynamo's local-variable prefix, then the root module's variable name
        tokens = tokens[2:]
    return "".join(t.lower() for t in tokens if t not in ("modules", "parameters"))


def split_compile(model: torch.nn.Module, bucket_mb: float, mode: str = "reduce-overhead",
                  backend=None) -> SplitCompiled:
    """torch.compile with inductor (`mode`, "reduce-overhead": CUDA graphs), the graph cut into pieces of about
    `bucket_mb` of parameters in backward order, as dynamo cuts it for a DDP module (its DDPOptimizer), so that
    a piece's gradients are complete when its part of the backward ends instead of at the end of the whole
    backward. Uses two private torch classes (torch._dynamo.backends.distributed.DDPOptimizer, the wrapper
    torch.compile builds for inductor): torch has no public way to cut a graph by parameter size. `backend`
    (a dynamo backend: graph module, example inputs -> callable) replaces inductor for each piece (tests)."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    cap = int(bucket_mb * 2**20)
    piece_backend = backend if backend is not None else torch._TorchCompileInductorWrapper(mode, None, None)
    splitter = DDPOptimizer(cap, piece_backend, first_bucket_cap=cap)
    return SplitCompiled(model, torch.compile(model, backend=splitter.compile_fn), splitter)


def replicate(model: torch.nn.Module, cfg: RunConfig, device: torch.device, group: dist.ProcessGroup | None = None,
              bucket_mb: float | None = None,
              sparse_embedding: bool = True) -> tuple[torch.nn.Module, GradientAverager]:
    """Data parallelism without a DDP module (train.grad_sync=coalesced), in apply_parallelism's order: activation
    checkpointing, compile, then the replicas: `model` on `device` with rank 0's weights, compiled (when
    cfg.train.compile) cut into pieces of `bucket_mb` (default train.ddp_bucket_mb) of parameters, as CUDA graphs
    with compile mode cudagraphs on CUDA; compile mode "blocks" compiles each block in place, whose gradients are
    then grouped in the order they arrive. With `sparse_embedding`, the gradient of the model's `embed_tokens`
    (when it is an nn.Embedding whose weight nothing else shares) is all-reduced as the rows of the tokens seen
    (GradientAverager's token_embedding; the caller passes every micro-step's host token ids to `note_tokens`).
    Returns (the module to call, its GradientAverager). Every process calls it, with the same model (the broadcast
    and the host group's creation are collectives; the latter over every process of the default group, even
    for a subgroup `group`)."""
    train = cfg.train
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    model.to(device)
    broadcast_parameters(model, group)
    bucket_mb = bucket_mb if bucket_mb is not None else train.ddp_bucket_mb
    module, pieces = model, None
    if train.compile and train.compile_mode == "blocks":
        apply_compile(model, "blocks")
    elif train.compile:
        graphs = train.compile_mode == "cudagraphs" and device.type == "cuda"  # no CUDA graphs without CUDA
        compiled = split_compile(model, bucket_mb, mode="reduce-overhead" if graphs else "default")
        module, pieces = compiled.module, compiled.pieces
    embedding = _untied_token_embedding(model) if sparse_embedding else None
    host_group = None
    if embedding is not None and "gloo" not in str(dist.get_backend(group)):
        # the row masks are reduced on the CPU, beside the GPU's NCCL group
        ranks = None if group is None else dist.get_process_group_ranks(group)
        host_group = dist.new_group(ranks=ranks, backend="gloo")
    averager = GradientAverager(model.parameters(), group, bucket_mb=bucket_mb, pieces=pieces,
                                token_embedding=embedding, host_group=host_group)
    return module, averager


def _untied_token_embedding(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """A TransformerLM's embedding weight (its LM head is untied and nothing else reads the table, so the gradient
    is zero outside the rows looked up), unless a module shares it; None for any other model, whose forward could
    read the table in ways no module lists (a tied head through F.linear would make the gradient dense)."""
    from dist_lm.model import TransformerLM

    embed = getattr(model, "embed_tokens", None)
    if not isinstance(model, TransformerLM) or not isinstance(embed, torch.nn.Embedding) or embed.sparse:
        return None
    uses = sum(p is embed.weight for _, p in model.named_parameters(remove_duplicate=False))
    return embed.weight if uses == 1 else None

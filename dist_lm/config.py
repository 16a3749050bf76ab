"""One typed config object for a whole run, loaded from YAML plus `key=value` overrides.

Design decisions:
- Nested dataclasses, one per part of the system; every field has a docstring. The YAML key, the
  dataclass field and the MLflow param name are the same dotted path (`optim.lr`).
- `load_config` rejects unknown keys, wrong types and impossible combinations with one
  `ValueError` that names the key and what is accepted, so a typo never trains the wrong model.
- Derived values (`head_dim`, `ffn_dim`, `global_batch_size`) are methods, never stored twice.
- No Hydra, no exec: PyYAML's safe loader and a small type checker driven by the annotations.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_lm.errors import UserError

AttentionBackend = Literal["auto", "triton", "sdpa", "reference"]
MixedPrecision = Literal["launcher", "no", "bf16", "fp16"]
FSDPUnit = Literal["block", "group", "model"]
CompileMode = Literal["model", "blocks", "cudagraphs"]
GradSync = Literal["ddp", "coalesced"]
ShardVerify = Literal["lazy", "full", "none"]


@dataclass
class ModelConfig:
    """Shape of the Transformer LM (pre-norm, RMSNorm, RoPE, SwiGLU, untied head)."""

    vocab_size: int = 10000
    """Number of token ids; must cover every id the tokenizer emits."""
    seq_len: int = 256
    """Context length in tokens (training window and generation limit)."""
    d_model: int = 512
    """Residual stream width."""
    num_layers: int = 12
    """Number of Transformer blocks."""
    num_heads: int = 8
    """Attention heads per block; d_model must be divisible by it."""
    d_ff: int | None = None
    """SwiGLU hidden width; null means 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the truncated-normal init (cut at +-3 std); output projections are scaled by 1/sqrt(2*num_layers)."""
    attention_backend: AttentionBackend = "auto"
    """Attention implementation: auto (triton on CUDA when available, else sdpa), triton, sdpa or reference."""
    fused_loss: bool = True
    """Compute LM head + cross-entropy in chunks (dist_lm.kernels.cross_entropy) so the fp32 logits of the
    whole batch never exist at once; false uses F.cross_entropy on the full logits."""

    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads

    def ffn_dim(self) -> int:
        """SwiGLU hidden width: d_ff, or 8/3 * d_model rounded up to a multiple of 64."""
        if self.d_ff is not None:
            return self.d_ff
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


@dataclass
class DataConfig:
    """Where the token shards live and how to make them when they are missing."""

    data_dir: str = "data/tinystories-sample"
    """Directory of token shards: train/, val/ and manifest.json (written by launch/prepare_data.py)."""
    source: str = "bundled:tinystories"
    """Text to tokenize when data_dir has no shards: 'bundled:tinystories' (the sample shipped in the
    package), a local .txt/.jsonl/.parquet path, or a datasets hub name such as roneneldan/TinyStories."""
    tokenizer_dir: str = "tokenizers/tinystories-10k"
    """Tokenizer directory (vocab.json, merges.txt, tokenizer_config.json); shards must have been made with it."""
    text_field: str = "text"
    """Column that holds the text in jsonl/parquet/hub sources."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation when the source has no validation split (taken from the end);
    in (0, 1)."""
    verify_shards: ShardVerify = "lazy"
    """Checksums of the token shards (manifest.json): lazy checks each 256 KiB block the first time a batch reads
    it; full reads every shard at start-up; none skips them. Sizes and the largest token id are checked either way."""


@dataclass
class OptimConfig:
    """AdamW hyperparameters and the learning-rate schedule (linear warmup, cosine to a floor)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-6
    """Floor of the cosine decay, kept after cosine_steps."""
    warmup_steps: int = 2000
    """Linear warmup length, in optimizer steps."""
    cosine_steps: int = 10000
    """Optimizer step at which the cosine reaches min_lr (counted from step 0, warmup included)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon, added to the square root of the second moment."""
    weight_decay: float = 1e-4
    """Decoupled weight decay, applied to matrices only (not norms, not embeddings)."""
    grad_clip: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    fused: bool = True
    """On CUDA, update all parameters with one Triton multi-tensor AdamW kernel (dist_lm.kernels.fused_adamw);
    elsewhere, or when false, the torch._foreach_* path."""


@dataclass
class TrainConfig:
    """The loop: batch, steps, precision, evaluation and logging."""

    seed: int = 1337
    """Fixes the init and the data order; the same seed and config give the same run: bit for bit on the CPU, on a
    GPU only with train.deterministic (else the kernels picked by timing at start-up may differ between runs, and
    some kernels are not deterministic)."""
    deterministic: bool = False
    """Bitwise-reproducible runs on a GPU: fixed attention kernel configs, no Inductor autotuning that changes
    numerics, PyTorch's deterministic algorithms (an op without one raises). Costs some speed
    (benchmarks/README.md); dist_lm/train/determinism.py says what it sets."""
    batch_size: int = 32
    """Sequences per process per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated into one optimizer step."""
    max_steps: int = 10000
    """Optimizer steps to train for."""
    mixed_precision: MixedPrecision = "launcher"
    """Autocast dtype: launcher (whatever the accelerate config / `accelerate launch --mixed_precision` says),
    no, bf16, or fp16 (fp16 adds a gradient scaler)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    compile_mode: CompileMode = "cudagraphs"
    """With train.compile: cudagraphs (the whole model, replayed as CUDA graphs: no per-kernel launch cost on the
    host, which otherwise leaves the GPU waiting at small batches; plain "model" where there is no CUDA), model
    (the whole model, kernels launched from the host), or blocks (each Transformer block compiled on its own:
    shorter compile). Ignored without train.compile. Under FSDP2 the compile follows train.fsdp_unit instead:
    block units compile block by block, one unit compiles the whole forward (never as CUDA graphs).
    benchmarks/README.md has the measurements behind the default."""
    activation_checkpointing: bool = False
    """Recompute each Transformer block's activations in the backward pass: less memory, about a third more
    compute."""
    fsdp_unit: FSDPUnit = "model"
    """Under FSDP2 (an accelerate config with distributed_type FSDP): what one all-gather covers. block: each
    Transformer block is its own unit (gathered just before it runs: the least memory, ~3 collectives per block
    per step); group: train.fsdp_group_blocks consecutive blocks per unit (fewer, larger collectives that still
    overlap the neighbouring units' compute); model: the whole model is one unit (optimizer state, master
    weights and gradients stay sharded, the bf16 weights are gathered once per step: the fewest collectives
    and hooks, none overlapped, for models whose blocks are too small to hide them). With train.compile, block
    and group units compile each block, the model unit the whole forward. The default is model: at the 124M
    shape on 2 GPUs it kept 96.9% of the 1-GPU speed against 54.4% (block) and 76.8% (groups of 4), with 7.55
    GiB per GPU against DDP's 9.10 (benchmarks/README.md, Scaling). Take block or group units when the gathered
    bf16 weights of the whole model (2 bytes a parameter) do not fit beside the activations."""
    fsdp_group_blocks: int = 4
    """With train.fsdp_unit=group: how many consecutive Transformer blocks share one FSDP2 unit."""
    ddp_bucket_mb: int = 125
    """Under DDP: gradient bucket size in MiB. Each bucket is all-reduced as soon as its gradients are ready, and a
    compiled model's graph is split at bucket boundaries so that this can happen (the trainer aligns the pieces
    with the buckets: parallel.align_compiled_pieces_with_buckets): small buckets (PyTorch's 25) cut the compiled
    graph into many pieces and slow the step; at 125 a 124M model has four pieces and the all-reduces of the
    first three overlap the backward, while the TinyStories shape's 134 MiB of fp32 gradients stay one piece,
    all-reduced after the backward (benchmarks/README.md, Scaling). The gradients are views into the buckets
    (gradient_as_bucket_view): the all-reduced bucket is the gradient, with no copy back (DDP still copies each
    fresh gradient of the backward into its bucket: 0.43 ms a step at 124M on an H200). Measured at 100, 125 and
    one bucket for the whole model (124M), 33 and 600 at TinyStories: 125 is as fast as any. With
    train.grad_sync=coalesced it sizes the compiled pieces, each all-reduced as one coalesced call."""
    grad_sync: GradSync = "ddp"
    """Under data parallelism (an accelerate config with several processes, not FSDP): how the gradients are
    averaged over the processes. ddp: torch's DistributedDataParallel (train.ddp_bucket_mb buckets, each gradient
    divided by the number of processes as DDP copies it into its bucket, the buckets summed). coalesced
    (experimental): no DDP module; the compiled graph is cut into pieces of train.ddp_bucket_mb of parameters and
    each piece's gradients are all-reduced in place, where the backward left them, as one coalesced call as soon
    as the piece's backward ends (dist_lm.parallel.grad_sync): none of DDP's copies of every gradient into a bucket.
    Every parameter must get a gradient in every step (true of TransformerLM). benchmarks/README.md, Scaling,
    compares the two."""
    eval_interval: int = 500
    """Evaluate on the validation split every this many optimizer steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation, per process."""
    log_interval: int = 10
    """Log loss, lr, grad norm and tokens/s every this many optimizer steps."""
    sample_tokens: int = 200
    """Tokens generated from the final model at the end of the run (0 skips it)."""
    sample_prompt: str = "Once upon a time"
    """Prompt for the end-of-run sample."""
    resume: str = ""
    """'' starts fresh (refusing a run_dir that already has checkpoints), 'latest' continues from the
    newest checkpoint in run_dir, 'auto' is 'latest' when run_dir holds a checkpoint and a fresh start otherwise (one
    command for a job's first start and its restarts), or a path to a checkpoint directory."""
    time_limit: str = ""
    """Wall-clock budget of this run from its start: seconds (5400), with a unit (90m, 2h) or SLURM's [D-]HH:MM:SS;
    '' is the end of the SLURM job the run is in (none outside SLURM), 'none' no limit at all. Before it runs out,
    the run saves a checkpoint and stops as on SIGTERM, keeping room for its longest step and its longest save so
    far (before the first save, an estimate) plus a margin (dist_lm/train/stop.py)."""
    stall_timeout_s: int = 300
    """Seconds any collective (gradient all-reduce, loss reduction, the stop check) may wait for the other processes;
    past it the job ends with a message naming what timed out instead of hanging (gloo's and NCCL's default is 30
    minutes). Give it more than the longest checkpoint save and evaluation, during which the others wait."""
    stop_check_steps: int = 10
    """Every this many optimizer steps the processes agree whether to stop (a signal, the time limit): one all-reduce
    of one integer over a gloo group on the CPU, which never waits for the GPU; a signal between checks takes effect
    at the next one. Why not every step: that all-reduce took 0.18 ms between two processes on the 2-core dev VM,
    0.9% of a 20.8 ms step at the TinyStories shape on an H100 if the host cannot hide it; every 10 steps it is under
    0.1%, and a stop waits at most 9 steps. One process needs no all-reduce."""


@dataclass
class CheckpointConfig:
    """Safetensors checkpoints under run_dir/checkpoints/step_NNNNNNN/."""

    interval: int = 1000
    """Save every this many optimizer steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""


@dataclass
class TrackingConfig:
    """MLflow tracking (main process only; a tracking failure warns and training goes on)."""

    enabled: bool = True
    """Log params and metrics to MLflow."""
    tracking_uri: str = ""
    """Where to log; '' uses MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "dist_lm"
    """MLflow experiment name."""
    system_metrics: bool = False
    """Also log every node's CPU, memory and GPU memory (and GPU utilisation where pynvml is installed) at each log
    step, as system/<node>/... (one gather over the processes per log interval)."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    name: str = "run"
    """Run name, used for the MLflow run and the default run directory."""
    run_dir: str = ""
    """Where checkpoints and the resolved config go; '' means runs/<name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def output_dir(self) -> Path:
        """The run directory: run_dir, or runs/<name>."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def tokens_per_step(self, num_processes: int) -> int:
        """Tokens consumed by one optimizer step across all processes."""
        return self.global_batch_size(num_processes) * self.model.seq_len

    def global_batch_size(self, num_processes: int) -> int:
        """Sequences per optimizer step across all processes."""
        return self.train.batch_size * self.train.grad_accum_steps * num_processes


# ----------------------------------------------------------------------------------------------
# Loading, type checking and validation


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or defaults when path is None) and apply dotted `key=value` overrides.

    >>> cfg = load_config(None, ["optim.lr=3e-4", "model.num_layers=2"])
    >>> cfg.optim.lr, cfg.model.num_layers
    (0.0003, 2)
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path} (pass an existing YAML file, "
                                    "e.g. configs/demo.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"config {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (e.g. the one stored in a checkpoint)."""
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dict of a config (tuples become lists, so it is YAML/JSON safe)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def flatten_config(cfg: RunConfig) -> dict[str, Any]:
    """Dotted-key view of the config ({'optim.lr': 1e-4, ...}): the MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                flat[name] = value

    walk("", config_to_dict(cfg))
    return flat


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise UserError(
            f"unknown config key {prefix}{unknown[0]!s} in {where}; accepted keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation; accept ints for floats and '1e-4' strings (YAML 1.1 reads them so)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            value = next((a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]), value)
        if value not in args:
            raise UserError(f"config key {key}={value!r} is not accepted; use {_type_name(hint)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config key {key}={value!r} must be a list of {len(args)} numbers, e.g. [0.9, 0.95]")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key {key}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `time_limit: 5400` or `name: 7` as numbers; the field wants the text
        if isinstance(value, bool):  # the words are lost by now: say how to keep them
            raise UserError(f"config key {key}={value!r} must be a string: YAML reads an unquoted "
                            f"yes/no/on/off/true/false as {value}; quote it, e.g. {key}='\"off\"'")
        raise UserError(f"config key {key}={value!r} must be a string")
    raise AssertionError(f"unsupported annotation {hint} for {key}")


def validate(cfg: RunConfig) -> None:
    """Reject impossible values with a message that names the key and what is accepted."""
    m, o, t, c = cfg.model, cfg.optim, cfg.train, cfg.checkpoint

    def need(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise UserError(f"config key {key}={value!r} is not accepted: {accepted}")

    for key, value in [
        ("model.vocab_size", m.vocab_size), ("model.seq_len", m.seq_len), ("model.d_model", m.d_model),
        ("model.num_layers", m.num_layers), ("model.num_heads", m.num_heads),
        ("train.batch_size", t.batch_size), ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.max_steps", t.max_steps), ("train.eval_interval", t.eval_interval),
        ("train.eval_batches", t.eval_batches), ("train.log_interval", t.log_interval),
        ("train.ddp_bucket_mb", t.ddp_bucket_mb), ("train.fsdp_group_blocks", t.fsdp_group_blocks),
        ("train.stall_timeout_s", t.stall_timeout_s), ("train.stop_check_steps", t.stop_check_steps),
    ]:
        need(value >= 1, key, value, "must be a positive integer")
    need(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
         f"must divide model.d_model={m.d_model} (try a divisor such as {_divisor_hint(m.d_model, m.num_heads)})")
    need(m.head_dim() % 2 == 0, "model.num_heads", m.num_heads,
         f"head_dim = d_model/num_heads = {m.head_dim()} must be even for RoPE")
    need(m.d_ff is None or m.d_ff >= 1, "model.d_ff", m.d_ff, "a positive integer or null")
    need(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    need(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    need(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    for key, value in [("optim.lr", o.lr), ("optim.min_lr", o.min_lr), ("optim.eps", o.eps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("model.rope_theta", m.rope_theta), ("model.init_std", m.init_std)]:
        need(math.isfinite(value), key, value, "must be a finite number")
    need(0 <= t.seed < 2**32, "train.seed", t.seed, "an integer in [0, 2**32)")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    need(o.warmup_steps <= o.cosine_steps, "optim.warmup_steps", o.warmup_steps,
         f"must be <= optim.cosine_steps={o.cosine_steps} (warmup cannot outlast the schedule)")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "each beta in [0, 1)")
    need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    need(0 < cfg.data.val_fraction < 1, "data.val_fraction", cfg.data.val_fraction,
         "must be in (0, 1): training evaluates on the held-out documents")
    need(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0 saves only at the end)")
    need(c.keep_last >= 0, "checkpoint.keep_last", c.keep_last, "must be >= 0 (0 keeps all)")
    need(t.sample_tokens >= 0, "train.sample_tokens", t.sample_tokens, "must be >= 0")
    from dist_lm.train.stop import parse_duration  # late: dist_lm.train imports this module

    limit = parse_duration(t.time_limit)
    need(limit is None or limit > 0, "train.time_limit", t.time_limit, "a positive duration, or '' for none")
    need(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "a non-empty name without '/'")


def _divisor_hint(d_model: int, num_heads: int) -> int:
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(divisors, key=lambda h: abs(h - num_heads))

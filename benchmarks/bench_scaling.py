"""Data-parallel scaling on one host: dist_lm DDP and FSDP2 vs HF Llama + Accelerate, 1 to N GPUs, and loss parity.

Run on a machine of 2 or more GPUs, one part per command (each under 8 minutes on 2xH100, compilation included):
    python benchmarks/bench_scaling.py --part dist_lm   # ours: 1 GPU, DDP, FSDP2; compiled (+ eager at 124m)
    python benchmarks/bench_scaling.py --part hf        # the anchor: LlamaForCausalLM, Accelerate DDP / FSDP2
    python benchmarks/bench_scaling.py --part parity    # the real trainer, 1 vs 2 GPUs at one global batch
`--gpus 2,4,8` runs the DDP/FSDP2 rows and the parity pairs at each of those GPU counts (default 2).
Each part prints the table of every part found in --results-dir (default runs/bench_scaling, which stays on a
warm device between calls), so the last command prints the whole comparison; `--part table` only prints it.
Rows go to <results-dir>/bench_scaling_<part>[_<tag>].json and to $OUT when set. `--dry-run` checks it all on
the CPU (gloo, a tiny shape, no compile).

`--save PATH` (with any part, `--part table` included) writes what the table shows as a results file
(benchmarks/render.py's format: the scaling rows of every part in --results-dir, their loss-parity rows, the
targets). A new measurement updates the README: `--part table --save $OUT/scaling.json` on the device after the
parts, copy it over benchmarks/results/scaling.json (scaling_parity.json for a parity part, ...), then
`python benchmarks/render.py`.

Design decisions:
- Every configuration is its own `accelerate launch` of benchmarks/scaling_step.py (the worker), with an explicit
  --config_file generated per run: a fresh process per row, so no compiled graph, allocator state or process
  group leaks from one configuration into the next, and the topology comes from the launcher config exactly as
  it does for launch/train.py. The cost is ~10 s of start-up per run, which the run counts below allow for.
- Weak scaling: the per-GPU batch is fixed, so tokens/s per GPU at N GPUs / at 1 GPU is the efficiency. The
  1-GPU baseline is the plain single-process run (distributed_type NO), what one would run on one GPU; for our
  FSDP2 rows it is therefore the trainer's default compile (CUDA graphs), and the efficiency includes FSDP2's own
  compile (per block, or the whole forward with one unit).
- The HF anchor runs in the same session on the same machine (another command of it): HF is compiled before
  `prepare` under DDP, and the FSDP2 rows use Accelerate's plugin with TRANSFORMER_BASED_WRAP on
  LlamaDecoderLayer, as the issue specifies.
- A per-part time budget (--budget-s): a run that would not finish in it is skipped and reported as skipped,
  never silently dropped; each run also has a timeout after which its process group is killed.
- Loss parity uses the real trainer (launch/train.py) at one global batch: 1 GPU with grad_accum N x B against
  N GPUs x B (DDP and FSDP2), and compares the per-step train/loss of the metrics.jsonl files. `--parity-noise`
  adds the yardstick, two 1-GPU runs of that global batch (the same run again; one batch of N x B), saved as the
  part "parity_noise"; with `--topologies single` it runs on one GPU.
"""

from __future__ import annotations

import os

# NVLink multicast must stay off on the shared device hosts (KINDS.md); forced (not setdefault) so an inherited
# "1" cannot switch it on, and passed explicitly to every child below.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train import SHAPES  # noqa: E402
from render import command_line, write_results  # noqa: E402
from scaling_common import (  # noqa: E402
    BASE_PORT,
    TOPOLOGIES,
    _fmt_gib,
    accelerate_config,
    compare_losses,
    free_port,
    print_table,
    profile_line,
    results,
    versions,
    write_config,
)
from scaling_step import ROW_PREFIX  # noqa: E402

from dist_lm.config import RunConfig, TrainConfig  # noqa: E402
from dist_lm.parallel import (  # noqa: E402
    COMPILE_MODES,
    FSDP_UNITS,
    ddp_kwargs,  # noqa: E402
)

WORKER = ROOT / "benchmarks" / "scaling_step.py"
PARTS = ("dist_lm", "hf", "parity", "table")


# ---------------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    """One `accelerate launch`: a worker configuration or a trainer run."""

    label: str
    topology: str
    num_processes: int
    script_args: list[str]
    script: Path = WORKER
    hf: bool = False
    regional_compile: bool = False
    info: dict = field(default_factory=dict)
    """Copied into the row: system, shape, compiled, ... (what the table groups by)."""


COMM_HOOK_LABELS = {"mean": "mean all-reduce hook", "mean-bf16": "mean all-reduce hook, bf16 on the wire",
                    "none": "DDP's own division (no hook)", "bf16": "Accelerate's bf16 hook"}


def _worker_common(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--compile-mode", args.compile_mode]
    if args.bucket_cap_mb is not None:
        out += ["--bucket-cap-mb", str(args.bucket_cap_mb)]
    out += [flag for flag, on in (("--gradient-as-bucket-view", args.gradient_as_bucket_view),
                                  ("--static-graph", args.static_graph), ("--no-clip", args.no_clip),
                                  ("--no-broadcast-buffers", args.no_broadcast_buffers),
                                  ("--h2d", args.h2d), ("--dry-run", args.dry_run),
                                  ("--compile-after-ddp", args.compile_after_ddp), ("--profile", args.profile),
                                  ("--no-align-pieces", args.no_align_pieces)) if on]
    if args.comm_hook is not None:
        out += ["--comm-hook", args.comm_hook]
    if args.grad_sync != "ddp":
        out += ["--grad-sync", args.grad_sync]
    if args.dense_embedding:
        out.append("--dense-embedding")
    if args.tokens_dir is not None:
        out += ["--tokens", str(args.tokens_dir)]
    if args.trace_dir:  # one folder per --tag, so a variant's traces never replace the default run's
        out += ["--trace-dir", str(Path(args.trace_dir).resolve() / (args.tag or "default"))]
    out += ["--fsdp-unit", args.fsdp_unit, "--fsdp-group-blocks", str(args.fsdp_group_blocks)]
    if args.ddp_optimizer != "ddp_optimizer":
        out += ["--ddp-optimizer", args.ddp_optimizer]
    if args.ddp_defaults != "trainer":
        out += ["--ddp-defaults", args.ddp_defaults]
    if args.fsdp_prefetch:
        out.append("--fsdp-prefetch")
    if args.dry_run:
        out += ["--mixed-precision", "no"]
    return out


def variant(args: argparse.Namespace, system: str, topology: str, compiled: bool) -> str:
    """What differs from the defaults, shown in the table (DDP knobs only matter to DDP rows)."""
    parts = []
    if system == "dist_lm" and compiled and topology != "fsdp" and args.compile_mode != TrainConfig.compile_mode:
        parts.append(f"compile {args.compile_mode}")
    if topology == "ddp":
        # dist_lm starts from the trainer's DDP settings (unless --ddp-defaults accelerate), HF from Accelerate's:
        # a knob is a variant only where it changes what that start gives.
        trainer = ddp_kwargs(RunConfig()) if system == "dist_lm" and args.ddp_defaults == "trainer" else None
        if system == "dist_lm" and trainer is None:
            parts.append("Accelerate's DDP defaults")
        if args.bucket_cap_mb is not None and (trainer is None or args.bucket_cap_mb != trainer.bucket_cap_mb):
            parts.append(f"bucket {args.bucket_cap_mb} MB")
        if args.gradient_as_bucket_view and (trainer is None or not trainer.gradient_as_bucket_view):
            parts.append("grad as bucket view")
        if args.static_graph:
            parts.append("static graph")
        if system == "dist_lm" and args.grad_sync == "coalesced":
            parts.append("no DDP: coalesced all-reduce where the backward leaves the gradients"
                         + (", whole embedding gradient" if args.dense_embedding else ""))
        if args.no_broadcast_buffers and trainer is None:  # the trainer's settings have it off already
            parts.append("no buffer broadcast")
        if args.comm_hook is not None and args.comm_hook != "none":
            parts.append(COMM_HOOK_LABELS[args.comm_hook])
        if args.ddp_optimizer != "ddp_optimizer" and compiled:
            parts.append(f"dynamo optimize_ddp={args.ddp_optimizer}")
        if args.no_align_pieces and system == "dist_lm" and compiled:
            parts.append("graph pieces not aligned with buckets")
        if args.compile_after_ddp and system == "dist_lm" and compiled:
            parts.append("compiled after DDP")
    if topology == "fsdp" and not args.reshard_after_forward:
        parts.append("no reshard after forward")
    if topology == "fsdp" and system == "dist_lm" and args.fsdp_unit != TrainConfig.fsdp_unit:  # the trainer's
        parts.append({"model": "whole model one unit", "block": "block units",
                      "group": f"units of {args.fsdp_group_blocks} blocks"}[args.fsdp_unit])
    if topology == "fsdp" and system == "dist_lm" and args.fsdp_prefetch and args.fsdp_unit == "block":
        parts.append("explicit prefetch")
    if system == "hf" and topology == "fsdp" and compiled and args.hf_fsdp_compile == "regional":
        parts.append("regional compile")
    if args.h2d and system == "dist_lm":
        parts.append("h2d copies")
    if args.tokens == "sample":
        parts.append("tokens of the bundled sample")
    if args.no_clip:
        parts.append("no clip")
    parts += [f"{k}={v}" for k, v in args.child_env]
    return ", ".join(parts)


def plan_benchmark(system: str, args: argparse.Namespace) -> list[Run]:
    """Most important first (compiled 1 GPU/DDP, then FSDP2, then eager), so a budget cut drops the extras."""
    shapes = ["dry-run"] if args.dry_run else args.shapes
    compiled_opts = [False] if args.dry_run else ([True] if args.quick else [True, False])
    runs = []
    for compiled in compiled_opts:
        for shape in shapes:
            if not compiled and not args.dry_run and shape not in args.eager_shapes:
                continue
            for topology, n in _topology_sizes(args):
                if system == "hf" and topology == "fsdp" and shape not in args.hf_fsdp_shapes + ["dry-run"]:
                    continue
                if args.dry_run and topology == "fsdp":
                    continue  # Accelerate runs no FSDP on the CPU (dist_lm falls back to DDP); YAMLs still checked
                regional = system == "hf" and topology == "fsdp" and compiled and args.hf_fsdp_compile == "regional"
                script_args = ["--system", system, *([] if args.dry_run else ["--shape", shape]),
                               *_worker_common(args)]
                if not compiled:
                    script_args.append("--no-compile")
                if regional:
                    script_args += ["--hf-compile", "accelerate"]
                size = "" if topology == "single" else f" x{n}"
                label = f"{system} {shape} {topology}{size} {'compiled' if compiled else 'eager'}"
                script_args += ["--tag", label]
                runs.append(Run(label, topology, n, script_args, hf=system == "hf", regional_compile=regional,
                                info={"system": system, "shape": shape, "topology": topology, "num_gpus": n,
                                      "compiled": compiled, "variant": variant(args, system, topology, compiled),
                                      "baseline_key": _baseline_key(args, system, shape, compiled)}))
    return runs


def _topology_sizes(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(topology, processes) in plan order: the 1-GPU baseline once, each multi-GPU topology at every --gpus."""
    return [(t, n) for t in args.topologies for n in ([1] if t == "single" else args.gpus)]


def _baseline_key(args: argparse.Namespace, system: str, shape: str, compiled: bool) -> str:
    """Rows sharing this key compare against the same 1-GPU run (DDP knobs do not change a 1-process run)."""
    mode = args.compile_mode if (system == "dist_lm" and compiled) else "-"
    return f"{system}|{shape}|{compiled}|{mode}|clip={not args.no_clip}|h2d={args.h2d and system == 'dist_lm'}"


def plan_parity(args: argparse.Namespace, results: Path) -> list[Run]:
    """Per N in --gpus: 1 GPU x (B, accumulation N) vs N GPUs x (B, accumulation 1), DDP and FSDP2 (those of
    --topologies): the same global batch, made of the same micro-batches. --parity-noise adds what two 1-GPU runs
    of that global batch differ by (the same run again; one batch of N x B), the yardstick for "within bf16
    noise"."""
    steps = 4 if args.dry_run else (50 if args.quick else args.parity_steps)
    batch = 2 if args.dry_run else args.parity_batch
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), f"train.max_steps={steps}",
              f"optim.cosine_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
              f"train.eval_interval={steps}", "train.eval_batches=4", "train.sample_tokens=0",
              "checkpoint.interval=0", "tracking.enabled=false", "train.log_interval=10",
              f"data.data_dir={results / 'parity' / 'data'}",
              f"data.tokenizer_dir={ROOT / 'tokenizers' / 'tinystories-10k'}",
              f"train.mixed_precision={'no' if args.dry_run else 'bf16'}",
              f"train.compile={str(not (args.dry_run or args.parity_eager)).lower()}"]
    if args.parity_shape != "demo":
        kwargs, _ = SHAPES[args.parity_shape]
        common += [f"model.{k}={v}" for k, v in kwargs.items()]
    multi = [t for t in (("ddp",) if args.dry_run else ("ddp", "fsdp")) if t in args.topologies]
    runs = []
    for gpus in args.gpus:
        # (topology, processes, accumulation, sequences per micro-step, noise: None or what the run repeats)
        plan = [("single", 1, gpus, batch, None)] + [(t, gpus, 1, batch, None) for t in multi]
        if args.parity_noise:  # the noise floor the N-GPU pairs are judged against, from 1-GPU runs alone
            plan += [("single", 1, gpus, batch, "repeat"), ("single", 1, 1, gpus * batch, "one_batch")]
        for topology, n, accum, micro, noise in plan:
            name = f"single_accum{accum}" if topology == "single" else f"{topology}_x{n}"
            name = {None: name, "repeat": f"{name}_repeat", "one_batch": f"single_batch{micro}"}[noise]
            run_dir = results / "parity" / name
            script_args = [*common, f"train.batch_size={micro}", f"train.grad_accum_steps={accum}",
                           f"run_dir={run_dir}", f"name=parity_{run_dir.name}"]
            if topology == "ddp":
                script_args.append(f"train.grad_sync={args.grad_sync}")
            label = f"trainer {topology} x{n} accum {accum}" + (f" batch {micro} ({noise})" if noise else "")
            runs.append(Run(label, topology, n, script_args, script=ROOT / "launch" / "train.py",
                            info={"run_dir": str(run_dir), "topology": topology, "num_gpus": n, "grad_accum": accum,
                                  "batch_per_gpu": micro, "steps": steps, "noise": noise, "noise_for": gpus}))
    return runs


def launch(run: Run, index: int, args: argparse.Namespace, tmp: Path, logs: Path) -> dict:
    """Start one run, wait for it (killing its process group on timeout) and return its row."""
    cfg = accelerate_config(run.topology, num_processes=run.num_processes, port=free_port(), hf=run.hf,
                            cpu=args.dry_run, regional_compile=run.regional_compile,
                            reshard_after_forward=args.reshard_after_forward)
    config = write_config(cfg, tmp / f"run{index:02d}_{run.topology}.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(config),
           "--num_processes", str(run.num_processes), str(run.script), *run.script_args]
    log = logs / f"{index:02d}_{run.label.replace(' ', '_')}.log"
    # PYTHONPATH: launch/train.py imports dist_lm, which need not be pip-installed on the device.
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **dict(args.child_env), **NO_MULTICAST, "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath}
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        # Own session: on timeout the whole tree (launcher + ranks) is ended through its process group id.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    rows = [json.loads(line[len(ROW_PREFIX):]) for line in text.splitlines() if line.startswith(ROW_PREFIX)]
    row = {**(rows[-1] if rows else {}), **run.info, "label": run.label, "wall_s": wall, "log": str(log)}
    if rc is None:
        row["error"] = f"timed out after {args.run_timeout} s"
    elif rc != 0:
        row["error"] = f"exit status {rc}"
    elif run.script == WORKER and not rows:
        row["error"] = "no result line"
    if "error" in row:
        tail = text.splitlines()[-25:]
        row["log_tail"] = tail
        print(f"    FAILED ({row['error']}); last lines of {log}:\n      " + "\n      ".join(tail), flush=True)
    return row


def execute(runs: list[Run], args: argparse.Namespace, results: Path) -> list[dict]:
    """Run the plan within the part's time budget; returns one row per planned run (skipped ones marked)."""
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, longest, rows = time.perf_counter(), 0.0, []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for i, run in enumerate(runs):
            elapsed = time.perf_counter() - start
            expected = max(longest, args.run_estimate_s)
            if elapsed + expected > args.budget_s:
                print(f"[{i + 1}/{len(runs)}] {run.label}: SKIPPED (budget: {elapsed:.0f} s used, ~{expected:.0f} s "
                      f"more needed, --budget-s {args.budget_s:.0f})", flush=True)
                rows.append({**run.info, "label": run.label, "error": "skipped: time budget"})
                continue
            print(f"[{i + 1}/{len(runs)}] {run.label} ...", flush=True)
            row = launch(run, i, args, Path(tmp), logs)
            longest = max(longest, row["wall_s"])
            if "tokens_per_s_per_gpu" in row:
                spread = row.get("step_ms_windows") or [row["step_ms"]]
                print(f"    {row['tokens_per_s_per_gpu'] / 1e3:,.1f}k tok/s/GPU | {row['step_ms']:.1f} ms (windows "
                      f"{min(spread):.1f}-{max(spread):.1f}) | peak "
                      f"{_fmt_gib(row['peak_mem_GiB'])} GiB | warm-up {row['warmup_s']:.1f} s | "
                      f"{row['wall_s']:.0f} s wall | compile: {row['compile']}", flush=True)
                for rank, prof in enumerate(row.get("profile_ranks") or []):
                    print(f"    rank {rank} " + profile_line(prof), flush=True)
            elif "error" not in row:
                print(f"    done in {row['wall_s']:.0f} s", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def load_parts(results: Path) -> dict[str, dict]:
    parts = {}
    for path in sorted(results.glob("bench_scaling_*.json")):
        parts[path.stem.removeprefix("bench_scaling_")] = json.loads(path.read_text())
    return parts


def save_part(name: str, data: dict, results: Path) -> None:
    text = json.dumps(data, indent=1)
    (results / f"bench_scaling_{name}.json").write_text(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"bench_scaling_{name}.json").write_text(text)
        for r in data["rows"]:  # failed runs' logs come back with the results; the rest stay on the machine
            if "error" in r and r.get("log") and Path(r["log"]).exists():
                (Path(out) / "logs").mkdir(exist_ok=True)
                shutil.copy(r["log"], Path(out) / "logs" / Path(r["log"]).name)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _csv(choices: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


def _gpu_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(s) for s in text.split(",") if s})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if not counts or counts[0] < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU counts must be >= 2 (the 1-GPU baseline always runs)")
    return counts


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    if key in NO_MULTICAST:
        raise argparse.ArgumentTypeError(f"{key} stays {NO_MULTICAST[key]} on these hosts (KINDS.md)")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=PARTS, required=True, help="what to run; 'table' only prints saved results")
    p.add_argument("--shapes", type=_csv(tuple(SHAPES)), default=["124m", "tinystories"], help="comma list")
    p.add_argument("--topologies", type=_csv(TOPOLOGIES), default=list(TOPOLOGIES),
                   help="comma list of single (1 GPU), ddp, fsdp (at each --gpus)")
    p.add_argument("--gpus", type=_gpu_counts, default=[2],
                   help="comma list of GPU counts (>= 2) for the ddp and fsdp rows and the parity runs, e.g. 2,4,8")
    p.add_argument("--eager-shapes", type=_csv(tuple(SHAPES)), default=["124m"], help="shapes also run eager")
    p.add_argument("--hf-fsdp-shapes", type=_csv(tuple(SHAPES)), default=["124m"],
                   help="shapes of the HF FSDP2-plugin anchor")
    p.add_argument("--quick", action="store_true", help="compiled configurations only, 15 timed steps, parity 50")
    p.add_argument("--steps", type=int, default=25, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens there)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=TrainConfig.compile_mode,
                   help="dist_lm compile granularity for 1 GPU and DDP (FSDP2 follows --fsdp-unit)")
    p.add_argument("--hf-fsdp-compile", choices=("before-prepare", "regional"), default="before-prepare",
                   help="HF FSDP2 anchor: torch.compile before prepare, or Accelerate's regional compilation")
    p.add_argument("--ddp-defaults", choices=("trainer", "accelerate"), default="trainer",
                   help="dist_lm DDP settings before the knobs below: the trainer's (train.ddp_bucket_mb, gradients "
                        "as bucket views) or Accelerate's (25 MB, copied); the HF anchor always has Accelerate's")
    p.add_argument("--bucket-cap-mb", type=int, default=None,
                   help="DDP knob (trainer: train.ddp_bucket_mb; Accelerate: 25)")
    p.add_argument("--gradient-as-bucket-view", action="store_true", help="DDP knob")
    p.add_argument("--static-graph", action="store_true", help="DDP knob")
    p.add_argument("--no-broadcast-buffers", action="store_true", help="DDP knob: broadcast_buffers=False")
    p.add_argument("--comm-hook", choices=tuple(COMM_HOOK_LABELS), default=None,
                   help="DDP knob: gradient comm hook (default none: DDP's own averaging, as the trainer)")
    p.add_argument("--no-align-pieces", action="store_true",
                   help="dist_lm DDP, compiled: dynamo's first graph piece at 1 MiB, not DDP's first bucket size")
    p.add_argument("--compile-after-ddp", action="store_true",
                   help="dist_lm DDP: torch.compile the DDP wrapper instead of DDP around the compiled model")
    p.add_argument("--ddp-optimizer", choices=("ddp_optimizer", "no_optimization"), default="ddp_optimizer",
                   help="DDP around a compiled model: dynamo splits the graph at buckets (torch's default) or "
                        "keeps one graph and all-reduces after the backward")
    p.add_argument("--no-reshard", dest="reshard_after_forward", action="store_false",
                   help="FSDP2: keep gathered parameters from forward to backward (fsdp_reshard_after_forward)")
    p.add_argument("--fsdp-unit", choices=FSDP_UNITS, default=TrainConfig.fsdp_unit,
                   help="dist_lm FSDP2 unit: each block, runs of blocks, or the whole model (train.fsdp_unit)")
    p.add_argument("--fsdp-group-blocks", type=int, default=TrainConfig.fsdp_group_blocks,
                   help="blocks per unit with --fsdp-unit group")
    p.add_argument("--fsdp-prefetch", action="store_true", help="dist_lm FSDP2: explicit next-block prefetch")
    p.add_argument("--profile", action="store_true", help="each run profiles 3 steps after timing (GPU/NCCL split)")
    p.add_argument("--grad-sync", choices=("ddp", "coalesced"), default="ddp",
                   help="dist_lm's 'ddp' rows: torch's DDP (the trainer's), or dist_lm.parallel.grad_sync (no DDP "
                        "module, gradients all-reduced where the backward leaves them; experimental)")
    p.add_argument("--dense-embedding", action="store_true",
                   help="with --grad-sync coalesced: all-reduce the whole embedding gradient, not the rows seen")
    p.add_argument("--tokens", choices=("random", "sample"), default="random",
                   help="benchmark rows' token ids: uniform random (the compute does not depend on them; the most "
                        "embedding rows for --grad-sync coalesced to all-reduce) or windows of the bundled "
                        "TinyStories sample (tokenized once into the results dir with the shipped 10k tokenizer)")
    p.add_argument("--trace-dir", default="",
                   help="with --profile: every rank writes a Chrome trace (.json.gz) of its profiled steps in "
                        "DIR/<--tag or 'default'>/ (benchmarks/trace_diff.py compares two)")
    p.add_argument("--child-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every run, e.g. NCCL_MAX_NCHANNELS=8 (fewer SMs for NCCL beside the "
                        "compute); repeatable; the NVLink-multicast switches cannot be changed")
    p.add_argument("--h2d", action="store_true", help="dist_lm copies a host batch per micro-step (trainer path)")
    p.add_argument("--no-clip", action="store_true", help="no gradient clipping in either system")
    p.add_argument("--parity-steps", type=int, default=200)
    p.add_argument("--parity-batch", type=int, default=16, help="sequences per GPU per micro-step (B)")
    p.add_argument("--parity-shape", choices=("demo", *SHAPES), default="demo", help="model of the parity runs")
    p.add_argument("--parity-eager", action="store_true", help="parity runs without torch.compile")
    p.add_argument("--parity-noise", action="store_true",
                   help="parity: also the 1-GPU noise floor per N: the 1-GPU accumulation-N run again, and one batch "
                        "of N x B (accumulation 1), each against the first 1-GPU run (--topologies single: only "
                        "those, on one GPU)")
    p.add_argument("--tag", default="", help="suffix of the results file, for variants (e.g. ddp_knobs)")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the table (every part in --results-dir) as a benchmarks/results/ file")
    p.add_argument("--title", default="Weak scaling and loss parity", help="the --save file's title")
    p.add_argument("--results-dir", type=Path, default=ROOT / "runs" / "bench_scaling",
                   help="where parts, logs and parity run dirs go (a temp dir with --dry-run)")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting runs past this many seconds")
    p.add_argument("--run-estimate-s", type=float, default=45, help="expected time of a run before one finished")
    p.add_argument("--run-timeout", type=float, default=240, help="kill a run after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU check: gloo, tiny shape, 1+1 steps, no compile")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 15, 3  # 3 windows of 5 steps
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step compiles)")
    if args.trace_dir and not args.profile:
        p.error("--trace-dir writes the traces of the profiled steps: add --profile")
    if args.dense_embedding and args.grad_sync != "coalesced":
        p.error("--dense-embedding is a setting of --grad-sync coalesced")
    args.tokens_dir = None  # set by main() for --tokens sample
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = args.results_dir
    if args.dry_run and "--results-dir" not in (argv if argv is not None else sys.argv):
        results = Path(tempfile.mkdtemp(prefix="bench_scaling_dry_"))
    results = results.resolve()
    if args.part == "table":
        parts = load_parts(results)
        if not parts:
            raise SystemExit(f"no bench_scaling_*.json in {results}; run a part first")
        print_table(parts)
        save_results(args, parts)
        return
    results.mkdir(parents=True, exist_ok=True)
    gpu_count, gpu = _gpus()
    needed = max(args.gpus) if set(args.topologies) - {"single"} else 1  # 1-GPU rows only: any GPU count
    if not args.dry_run and gpu_count < needed:
        raise SystemExit(f"--gpus {','.join(map(str, args.gpus))} needs {needed} CUDA GPUs (found "
                         f"{gpu_count}); --dry-run checks it on the CPU")
    # Every YAML this part can use is checked through Accelerate's loader before anything runs.
    with tempfile.TemporaryDirectory() as tmp:
        for topology in TOPOLOGIES:
            for hf in (False, True):
                for n in ([1] if topology == "single" else args.gpus):
                    write_config(accelerate_config(topology, num_processes=n, port=BASE_PORT, hf=hf),
                                 Path(tmp) / f"{topology}_{n}_{hf}.yaml")
        write_config(accelerate_config("ddp", num_processes=2, port=BASE_PORT, cpu=True), Path(tmp) / "cpu.yaml")

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(), "gpu": gpu, "gpu_count": gpu_count, "host": platform.node(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "command": command_line("benchmarks/bench_scaling.py", argv)}
    noise = "_noise" if args.part == "parity" and args.parity_noise else ""  # kept beside a plain parity part's file
    name = args.part + noise + (f"_{args.tag}" if args.tag else "") + ("_dry_run" if args.dry_run else "")
    t0 = time.perf_counter()
    if args.part == "parity":
        runs = plan_parity(args, results)
        for run in runs:  # a fresh run each time: the trainer refuses to start over existing checkpoints
            shutil.rmtree(run.info["run_dir"], ignore_errors=True)
        rows = execute(runs, args, results)
        data = {"meta": meta, "rows": rows, "comparisons": compare_losses(rows)}
    else:
        if args.tokens == "sample":  # tokenized once, read by every run of this part
            args.tokens_dir = sample_tokens(results / "tokens" / "tinystories-sample")
        rows = execute(plan_benchmark(args.part, args), args, results)
        data = {"meta": meta, "rows": rows}
    meta["wall_s"] = time.perf_counter() - t0
    save_part(name, data, results)
    print(f"\n{args.part}: {len(data['rows'])} run(s) in {meta['wall_s']:.0f} s; results in {results}\n")
    parts = load_parts(results)
    if args.dry_run:  # a dry run's table shows only itself, never mixed with real measurements
        parts = {name: data}
    print_table(parts)
    save_results(args, parts)
    if any("error" in r for r in data["rows"]):
        sys.exit(1)


def save_results(args: argparse.Namespace, parts: dict[str, dict]) -> None:
    """--save: the parts as one results file (benchmarks/render.py), what the table printed above shows."""
    if args.save:
        write_results(args.save, title=args.title, **results(parts))
        print(f"wrote {args.save}")


def sample_tokens(out: Path) -> Path:
    """The bundled TinyStories sample as token shards (the shipped 10k tokenizer), made once in `out`."""
    if not (out / "manifest.json").exists():
        from dist_lm.data import prepare_shards

        prepare_shards("bundled:tinystories", ROOT / "tokenizers" / "tinystories-10k", out, log=lambda *_: None)
    return out


def _gpus() -> tuple[int, str]:
    """(number of CUDA devices, name of the first): read in the driver, which itself never initialises NCCL."""
    import torch

    if not torch.cuda.is_available():
        return 0, "cpu"
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()

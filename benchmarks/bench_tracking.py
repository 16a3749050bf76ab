"""What MLflow tracking costs a real training run: tokens/s with tracking off, into sqlite, and into a local server.

    python benchmarks/bench_tracking.py --shapes seed,124m      # one CUDA GPU
    python benchmarks/bench_tracking.py --shapes cpu            # the CPU (the demo model)
    [--steps N] [--repeats R] [--save PATH]

Each measurement is the path users run: `accelerate launch launch/train.py --config ...` in a fresh process, on real
shards of the bundled TinyStories sample (prepared by the trainer on first use), with its evaluations, a checkpoint
half way, and tracking as configured:
- off:    tracking.enabled=false
- sqlite: tracking.tracking_uri=sqlite:///<tmp>/mlflow.db (the default store, a file)
- server: a local `mlflow server` this script starts (sqlite behind it), tracking.tracking_uri=http://127.0.0.1:PORT

Design decisions:
- tokens/s is what the trainer itself logs (perf/tokens_per_s per log interval, timed between two host syncs),
  combined as total tokens over total time of every interval after the first `--skip` ones (compilation and
  warm-up), so a slow interval (a flush, a checkpoint's neighbour) counts with its full weight; evaluation and
  checkpoint time are kept out of it by the trainer, the same in every mode.
- One short untimed run (`--warmup-steps`, tracking off) goes first: it prepares the shards and fills the
  compile caches. On an H100 the first run of a cold machine was 1.2% slower than the same mode later (seed,
  2026-12-07), more than the target, and always hit whichever mode came first.
- Modes alternate within each repeat, in an order rotated from one repeat to the next (off, sqlite, server, then
  sqlite, server, off, ...): a machine that drifts during a repeat would otherwise always penalise the mode that
  runs last. The table shows each repeat and the mean.
- The cost of a mode is 1 - its tokens/s over the off run's of the same repeat, the median over repeats (a pair is
  minutes apart, so a drifting machine moves both alike); the issue's target is <= 1%.
- Shapes: seed = configs/tinystories_seed.yaml (48.8M parameters, batch 32 x 256, bf16) compiled (train.compile
  is off in the config; the issue's 845k tokens/s is the compiled trainer), 124m = bench_train's 124M shape (d768,
  12 layers, vocab 32,000, batch 16 x 1024, bf16, compiled), cpu = configs/demo.yaml (eager), cpu-tiny = the demo
  config at d32, 2 layers, batch 4 x 32: a step of a few milliseconds, host-bound as an eager GPU step is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from render import command_line, package_versions, write_results  # noqa: E402

MODES = ("off", "sqlite", "server")
# name: (config, overrides, default steps, log interval)
SHAPES: dict[str, tuple[str, list[str], int]] = {
    "seed": ("tinystories_seed.yaml", ["train.log_interval=50", "train.compile=true"], 3000),
    "124m": ("tinystories_seed.yaml", ["train.compile=true", "model.d_model=768", "model.num_layers=12",
                                       "model.num_heads=12", "model.d_ff=2048", "model.vocab_size=32000",
                                       "model.seq_len=1024", "train.batch_size=16", "train.log_interval=20"], 800),
    "cpu": ("demo.yaml", ["train.log_interval=10"], 200),
    # host-bound: a step of a few ms, mostly Python, like an eager GPU step; what competes for the GIL shows here
    "cpu-tiny": ("demo.yaml", ["train.log_interval=20", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
                               "model.seq_len=32", "train.batch_size=4"], 3000),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a sqlite store, in its own process group (stopped with everything it started)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        log = open(root / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"mlflow server did not answer in 180 s: {(root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def train_command(shape: str, mode: str, run_dir: Path, data_dir: Path, steps: int, uri: str | None,
                  accelerate_config: str) -> list[str]:
    config, overrides, _ = SHAPES[shape]
    tracking = ["tracking.enabled=false"] if mode == "off" else ["tracking.enabled=true",
                                                                 f"tracking.tracking_uri={uri}"]
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
            str(ROOT / "configs" / "accelerate" / accelerate_config), str(ROOT / "launch" / "train.py"),
            "--config", str(ROOT / "configs" / config), *overrides,
            f"name=bench-tracking-{shape}-{mode}", f"run_dir={run_dir}", f"data.data_dir={data_dir}",
            "data.source=bundled:tinystories", f"data.tokenizer_dir={ROOT / 'tokenizers' / 'tinystories-10k'}",
            f"train.max_steps={steps}", f"optim.cosine_steps={steps}",
            f"optim.warmup_steps={min(100, steps // 10)}", f"train.eval_interval={steps // 2}",
            f"checkpoint.interval={steps // 2}", "checkpoint.keep_last=1", "train.sample_tokens=0",
            "tracking.experiment=bench-tracking", *tracking]


def train(cmd: list[str], run_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """One training process to its end (stops the benchmark if it fails); the process and its wall time."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir.parent,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, time.monotonic() - started


def run_once(cmd: list[str], run_dir: Path, skip: int) -> dict:
    """One training process; its tokens/s over the log intervals after the first `skip`, and its wall time."""
    proc, wall = train(cmd, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [(r["step"], r["perf/tokens_per_s"]) for r in rows if "perf/tokens_per_s" in r]
    kept = [v for _, v in speeds[skip:]]
    if len(kept) < 3:
        raise SystemExit(f"only {len(speeds)} log intervals in {run_dir}; raise --steps")
    # Equal-length intervals: total tokens over total time is the harmonic mean of their rates.
    return {"tokens_per_s": statistics.harmonic_mean(kept), "intervals": len(kept), "wall_s": wall,
            "unsent_line": "were not sent" in proc.stdout}


def measure(shape: str, args, work: Path) -> list[dict]:
    steps = args.steps or SHAPES[shape][2]
    data_dir = work / "data" / "tinystories-sample"  # shared by every run: prepared once, by the first
    server = Server(work / f"server-{shape}") if "server" in args.modes else None
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    try:
        if args.warmup_steps:
            warmup = work / "runs" / f"{shape}-warmup"
            cmd = train_command(shape, "off", warmup, data_dir, args.warmup_steps, None, args.accelerate_config)
            _, wall = train(cmd, warmup)
            print(f"  {shape:>5} warm-up: {args.warmup_steps} steps, {wall:.0f} s", flush=True)
            shutil.rmtree(warmup, ignore_errors=True)
        for repeat in range(args.repeats):
            shift = repeat % len(args.modes)
            for mode in args.modes[shift:] + args.modes[:shift]:  # each mode first, middle, last in turn
                run_dir = work / "runs" / f"{shape}-{mode}-{repeat}"
                uri = {"off": None, "sqlite": f"sqlite:///{work / f'mlflow-{shape}.db'}",
                       "server": server.uri if server else None}[mode]
                cmd = train_command(shape, mode, run_dir, data_dir, steps, uri, args.accelerate_config)
                r = run_once(cmd, run_dir, args.skip)
                results[mode].append(r)
                print(f"  {shape:>5} {mode:>6} #{repeat + 1}: {r['tokens_per_s']:>12,.0f} tok/s over {r['intervals']} "
                      f"intervals, {r['wall_s']:.0f} s wall", flush=True)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # disk, not needed any more
    finally:
        if server is not None:
            server.stop()
    rows = []
    for mode, runs in results.items():
        # Each repeat's run against the off run of the same repeat (minutes apart, not the whole benchmark), the
        # median over repeats: a machine that drifts moves both sides of a pair alike.
        pairs = [r["tokens_per_s"] / off["tokens_per_s"] for r, off in zip(runs, results["off"])]
        rows.append({"shape": shape, "mode": mode, "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                     "runs": [round(r["tokens_per_s"]) for r in runs], "steps": steps,
                     "overhead": 1 - statistics.median(pairs) if mode != "off" else None,
                     "wall_s": statistics.mean(r["wall_s"] for r in runs)})
    return rows


def targets_of(rows: list[dict]) -> list[dict]:
    """The issue's target (cost <= 1%) per shape and mode, judged against the noise the runs show: with one run per
    mode there is no noise figure, and where one mode's runs spread wider than the target, no verdict either."""
    out = []
    for r in rows:
        if r["overhead"] is None:
            continue
        same_shape = [q["runs"] for q in rows if q["shape"] == r["shape"]]
        if min(map(len, same_shape)) < 2:
            note, met = "one run per mode: no noise figure", None
        else:
            spread = max((max(v) - min(v)) / statistics.mean(v) for v in same_shape)
            note = f"one mode's runs spread {spread:.1%}"
            # a verdict only where the runs repeat more closely than the target
            met = r["overhead"] <= 0.01 if spread <= 0.01 else None
        out.append({"target": f"tracking ({r['mode']}) costs ≤ 1% of tokens/s at {r['shape']}",
                    "result": f"{r['overhead']:+.2%} ({note})", "met": met})
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':>6} {'mode':>7} {'tokens/s (mean)':>16} {'cost':>9}  runs (cost: median over repeats of "
          "1 - mode / off)")
    for r in rows:
        over = f"{r['overhead']:+.2%}" if r["overhead"] is not None else "-"
        print(f"{r['shape']:>6} {r['mode']:>7} {r['tokens_per_s']:>16,.0f} {over:>9}  "
              f"{' / '.join(f'{v:,}' for v in r['runs'])}")


def hardware() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"gpu": torch.cuda.get_device_name(), "gpu_count": 1}
    return {"cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="seed,124m", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: per shape)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps of the untimed first run (0: none)")
    parser.add_argument("--skip", type=int, default=2, help="first log intervals left out (compile, warm-up)")
    parser.add_argument("--accelerate-config", default="single.yaml", help="under configs/accelerate/")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs, data and stores go (default: tmp)")
    parser.add_argument("--save", type=Path, default=None, help="also write the results file here")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    shapes = [s for s in args.shapes.split(",") if s]
    for name, chosen, known in (("shape", shapes, SHAPES), ("mode", args.modes, MODES)):
        if any(c not in known for c in chosen):
            raise SystemExit(f"unknown {name} in {chosen}; choose from {list(known)}")
    if "off" not in args.modes:
        raise SystemExit("--modes must include off: the overhead is measured against it")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_tracking-"))
    rows = []
    for shape in shapes:
        rows += measure(shape, args, work)
    print_table(rows)
    if args.save:
        targets = targets_of(rows)
        write_results(args.save, title="Tracking overhead: the real trainer with MLflow off, sqlite, a local server",
                      hardware=hardware(), versions=package_versions("torch", "triton", "mlflow", "accelerate"),
                      commands=[command_line("benchmarks/bench_tracking.py")], tables={"tracking": rows},
                      targets=targets)
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()

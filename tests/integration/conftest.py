"""Fixtures for runs through the real entry points: `accelerate launch launch/train.py` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tokenizers" / "tinystories-10k"
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The bundled TinyStories sample tokenized once per session with the shipped tokenizer."""
    from dist_lm.data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "tinystories-sample"
    prepare_shards("bundled:tinystories", TOKENIZER, out, log=lambda *_: None)
    return out


def tiny_run(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a small, fast model on the demo config (tracking off unless a test turns it on)."""
    return [
        f"run_dir={run_dir}", f"name={run_dir.name}", f"data.data_dir={data_dir}", f"data.tokenizer_dir={TOKENIZER}",
        "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.seq_len=32",
        "optim.warmup_steps=2", "optim.cosine_steps=20", "optim.lr=1e-2",
        "train.batch_size=8", "train.max_steps=6", "train.log_interval=2", "train.eval_interval=3",
        "train.eval_batches=2", "train.sample_tokens=0", "checkpoint.interval=3", "checkpoint.keep_last=0",
        "tracking.enabled=false", *extra,
    ]


def checkout_env() -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's dist_lm (not whatever is installed),
    and must not log into a user's MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def launch(overrides: list[str], *, accelerate_config: str | None = "single.yaml", cwd: Path,
           env: dict[str, str] | None = None, config: Path | None = ROOT / "configs" / "demo.yaml",
           timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launch/train.py through `accelerate launch` (or plain python when accelerate_config is None)."""
    return subprocess.run(trainer_command(overrides, accelerate_config, config), cwd=cwd, env=trainer_env(env),
                          capture_output=True, text=True, timeout=timeout)


def trainer_command(overrides: list[str], accelerate_config: str | None,
                    config: Path | None = ROOT / "configs" / "demo.yaml") -> list[str]:
    """launch/train.py with `overrides`, through `accelerate launch -q` or, when accelerate_config is None, plain
    python (the worker itself, so that a signal reaches it)."""
    script = [str(ROOT / "launch" / "train.py")] + (["--config", str(config)] if config else []) + overrides
    if accelerate_config is None:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
            str(ACCELERATE_CONFIGS / accelerate_config), *script]


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**checkout_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra or {})}


# a run that goes on until something stops it, logging every step
LONG = ("train.max_steps=100000", "optim.cosine_steps=100000", "train.log_interval=1", "train.eval_interval=100000",
        "checkpoint.interval=100000")


def start(run_dir: Path, data: Path, *extra: str, accelerate_config: str | None = None,
          own_session: bool = False) -> subprocess.Popen:
    """The trainer in the background on a tiny run (trainer_command); own_session: in a process group of its own
    (its pid is the group's), as a shell runs a job."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(trainer_command(tiny_run(run_dir, data, *extra), accelerate_config), cwd=run_dir.parent,
                            env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_session)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl has logged `step` (the run is past start-up and training)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                 if line.endswith("}")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {timeout} s")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-5000:]}")
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss of every step, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    """Validation loss of every evaluation, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}

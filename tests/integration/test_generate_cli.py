"""launch/generate.py as a user runs it: --prompts-file gives one JSON line per prompt in the input order, the same
whatever the batch size and the same as a single --prompt; a single --prompt streams; bad files get one line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TOKENIZER, checkout_env, ok

from dist_lm.config import ModelConfig, RunConfig, config_to_dict
from dist_lm.model import TransformerLM
from dist_lm.tokenizer import load_tokenizer
from dist_lm.train.checkpoint import save_checkpoint

PROMPTS = ["Once upon a time", "Tom had a red ball. He", "The sun", "Lily and her mom went to the park to play on the",
           "A"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with one checkpoint of a small random model (the CLI only reads it)."""
    import torch

    cfg = RunConfig(model=ModelConfig(vocab_size=7040, seq_len=64, d_model=32, num_layers=2, num_heads=2))
    cfg.data.tokenizer_dir = str(TOKENIZER)
    run = tmp_path_factory.mktemp("gen") / "run"
    state = {"config": config_to_dict(cfg), "tokenizer_fingerprint": load_tokenizer(TOKENIZER).fingerprint()}
    torch.manual_seed(0)
    save_checkpoint(run, 3, TransformerLM(cfg.model).state_dict(), {}, state)
    return run


def generate(run: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**checkout_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--checkpoint", str(run), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps(p) if i % 2 else json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is skipped
    return path


def test_json_lines_in_input_order_whatever_the_batch(tmp_path, run_dir):
    path = prompts_file(tmp_path)
    common = ["--prompts-file", str(path), "--temperature", "0", "--max-new-tokens", "12"]
    batched = ok(generate(run_dir, *common, "--batch-size", "2", cwd=tmp_path)).stdout.splitlines()
    rows = [json.loads(line) for line in batched]
    assert [r["prompt"] for r in rows] == PROMPTS
    tokenizer = load_tokenizer(TOKENIZER)
    for r in rows:
        assert set(r) == {"prompt", "completion", "prompt_tokens", "completion_tokens"}
        assert r["prompt_tokens"] == len(tokenizer.encode(r["prompt"]))
        assert 0 <= r["completion_tokens"] <= 12 and r["completion"]
    one_by_one = ok(generate(run_dir, *common, "--batch-size", "1", cwd=tmp_path)).stdout.splitlines()
    all_at_once = ok(generate(run_dir, *common, "--batch-size", "64", cwd=tmp_path)).stdout.splitlines()
    assert batched == one_by_one == all_at_once  # greedy: the batch changes nothing
    single = ok(generate(run_dir, "--prompt", PROMPTS[1], "--temperature", "0", "--max-new-tokens", "12",
                         cwd=tmp_path)).stdout
    assert single == rows[1]["prompt"] + rows[1]["completion"] + "\n"


def test_output_file_and_seeded_sampling(tmp_path, run_dir):
    path = prompts_file(tmp_path)
    args = ["--prompts-file", str(path), "--batch-size", "3", "--max-new-tokens", "10", "--temperature", "1.0",
            "--top-k", "50", "--seed", "5"]
    proc = ok(generate(run_dir, *args, "--output", str(tmp_path / "out.jsonl"), cwd=tmp_path))
    assert proc.stdout == ""
    written = (tmp_path / "out.jsonl").read_text()
    assert len(written.splitlines()) == len(PROMPTS)
    assert ok(generate(run_dir, *args, cwd=tmp_path)).stdout == written  # same seed, same samples


def test_single_prompt_streams_before_the_end(tmp_path, run_dir):
    # ~2,000 greedy tokens (sliding past the 64-token window) take seconds on the CPU: text must show up long
    # before the process ends, token by token, not in one print at the end.
    cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), "--checkpoint", str(run_dir), "--prompt",
           "Once upon a time", "--temperature", "0", "--max-new-tokens", "2000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**checkout_env(), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while len(seen) <= len("Once upon a time") + 20 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        still_running = proc.poll() is None
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert seen.startswith(b"Once upon a time") and len(seen) > len("Once upon a time") + 20, (seen, err)
    assert still_running, "the continuation only appeared once generation had finished"
    text = (seen + rest).decode()
    assert text.endswith("\n") and len(text) > 2000  # about a word piece per token


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_bad_prompts_files_get_one_line(tmp_path, run_dir):
    missing = tmp_path / "nope.jsonl"
    one_line_error(generate(run_dir, "--prompts-file", str(missing), cwd=tmp_path), str(missing), "does not exist")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    one_line_error(generate(run_dir, "--prompts-file", str(empty), cwd=tmp_path), "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": "unclosed\n')
    one_line_error(generate(run_dir, "--prompts-file", str(bad), cwd=tmp_path), f"{bad}:2: not JSON")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "wrong key"}\n')
    one_line_error(generate(run_dir, "--prompts-file", str(no_text), cwd=tmp_path), f"{no_text}:1: no prompt text")
    one_line_error(generate(run_dir, "--prompts-file", str(bad), "--prompt", "x", cwd=tmp_path), "not both")

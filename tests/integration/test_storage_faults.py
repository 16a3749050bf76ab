"""What clusters do to runs, done for real to real runs: random bytes written into checkpoint files and token
shards, a checkpoint whose state.json is gone, shards with ids beyond the vocabulary, a manifest missing a key,
and a run directory on a size-limited tmpfs that fills up. Each ends in one `error:` line naming the file (exit 2)
and loses nothing; where the run can go on, it continues with the losses of a run that never met the fault."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TOKENIZER, checkout_env, launch, ok, step_losses, tiny_run

from dist_lm.data.shards import shard_record
from dist_lm.train.checkpoint import load_checkpoint


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def scribble(path: Path, count: int = 1000) -> None:
    """Random bytes over the middle of a file, its size unchanged: what bit rot or a bad copy does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = os.urandom(count)
    path.write_bytes(bytes(data))


def train(run: Path, shards: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return launch(tiny_run(run, shards, *extra), cwd=cwd, accelerate_config=None)


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / name), *args], cwd=cwd, env=checkout_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, sample_shards) -> Path:
    """A 6-step run that met no fault (checkpoints at steps 3 and 6): its losses are what a resumed run must give."""
    run = tmp_path_factory.mktemp("straight") / "run"
    ok(train(run, sample_shards, cwd=run.parent))
    return run


@pytest.fixture
def shards(tmp_path, sample_shards) -> Path:
    """A private copy of the sample's shards, to damage."""
    return Path(shutil.copytree(sample_shards, tmp_path / "shards"))


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_bit_rot_in_a_checkpoint_is_named_and_nothing_is_deleted(tmp_path, sample_shards, straight, name):
    run = Path(shutil.copytree(straight, tmp_path / "run"))
    damaged = run / "checkpoints" / "step_0000006" / name
    scribble(damaged)
    before = snapshot(run / "checkpoints")
    proc = train(run, sample_shards, "train.resume=latest", "train.max_steps=9", cwd=tmp_path)
    one_line_error(proc, f"checkpoint file {damaged} is corrupt (its sha256 is ",
                   f"use the earlier checkpoint {run / 'checkpoints' / 'step_0000003'}")
    gen = script("generate.py", "--checkpoint", str(run), "--max-new-tokens", "5", cwd=tmp_path)
    if name == "model.safetensors":
        one_line_error(gen, f"checkpoint file {damaged} is corrupt")
    else:  # generation reads only the weights, and those are verified intact: it works
        assert ok(gen).stdout.startswith("Once upon a time")
    assert snapshot(run / "checkpoints") == before


def test_missing_state_json_resumes_from_the_older_checkpoint_with_a_warning(tmp_path, sample_shards, straight):
    run = tmp_path / "run"
    ok(train(run, sample_shards, "train.max_steps=5", cwd=tmp_path))  # checkpoints at steps 3 and 5
    incomplete = run / "checkpoints" / "step_0000005"
    (incomplete / "state.json").unlink()  # what a crash mid-prune, or a hand, leaves
    proc = ok(train(run, sample_shards, "train.resume=latest", cwd=tmp_path))
    assert f"skips the incomplete checkpoint {incomplete}: it has no state.json" in proc.stderr, proc.stderr
    assert "resuming at step 3" in proc.stdout + proc.stderr
    a, b = step_losses(straight), step_losses(run)
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)  # bit-identical on the CPU
    assert incomplete.is_dir()  # warned about, never deleted


# ----------------------------------------------------------------------------------------------
# Token shards


def test_bit_rot_in_a_token_shard_stops_the_run_naming_it(tmp_path, shards):
    damaged = shards / "train" / "shard_000000.bin"
    scribble(damaged)  # block 0 (bytes 0-262,143), which the first steps read
    proc = train(tmp_path / "run", shards, cwd=tmp_path)
    line = one_line_error(proc, f"shard {damaged}, bytes 0-262,143: checksum mismatch", "prepare_data.py")
    assert "IndexError" not in proc.stderr, line
    proc = script("prepare_data.py", "--verify", str(shards), cwd=tmp_path)  # the full check finds it too
    one_line_error(proc, "1 damaged block(s)", f"{damaged}, bytes 0-262,143")


def test_prepare_data_verify_passes_clean_shards(tmp_path, sample_shards):
    proc = ok(script("prepare_data.py", "--verify", str(sample_shards), cwd=tmp_path))
    assert "2 shards" in proc.stdout and "every checksum matches" in proc.stdout


def test_ids_beyond_the_tokenizer_are_refused_at_open(tmp_path, shards):
    # Ids 7028..9999 fit the model's embedding (vocab_size 10000) but no tokenizer made them: before, they trained
    # silently. The shard and its manifest entry are consistent (as if made with another tokenizer's ids).
    path = shards / "train" / "shard_000000.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[1000:1010] = 9000
    tokens.tofile(path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(shard_record(tokens))
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = train(tmp_path / "run", shards, cwd=tmp_path)
    one_line_error(proc, f"shard {path} holds token ids up to 9000", "beyond the vocabulary's 7028 ids")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_manifest_without_tokenizer_fingerprint_is_one_line(tmp_path, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["tokenizer_fingerprint"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = train(tmp_path / "run", shards, cwd=tmp_path)
    one_line_error(proc, f"{shards / 'manifest.json'} has no tokenizer_fingerprint", "prepare_data.py --overwrite")


# ----------------------------------------------------------------------------------------------
# A full disk: the run directory on a size-limited tmpfs


@contextlib.contextmanager
def tmpfs(directory: Path, size_bytes: int):
    """A tmpfs of `size_bytes` mounted on `directory` for the block (root only: skips with the reason otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs to fill up (needs root): {proc.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_full_disk_is_one_line_and_the_run_continues_once_there_is_room(tmp_path, sample_shards, straight):
    checkpoint = sum(p.stat().st_size for p in (straight / "checkpoints" / "step_0000003").iterdir())  # ~8.1 MB
    # Room for the step-3 checkpoint, the logs and part of a second checkpoint: the step-6 save fails.
    with tmpfs(tmp_path / "disk", checkpoint * 135 // 100) as disk:
        run = disk / "run"
        proc = train(run, sample_shards, cwd=tmp_path)
        line = one_line_error(proc, f"could not save checkpoint {run / 'checkpoints' / 'step_0000006'}: No space left "
                              "on device (", " free on that filesystem, the checkpoint needs about ",
                              "the latest intact checkpoint, step_0000003, is kept", "train.resume=latest")
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"], line  # no .tmp-* left
        assert load_checkpoint(run / "checkpoints" / "step_0000003").state["step"] == 3  # checksums match
        subprocess.run(["mount", "-o", f"remount,size={4 * checkpoint}", str(disk)], check=True)  # room made
        ok(train(run, sample_shards, "train.resume=latest", cwd=tmp_path))
        a, b = step_losses(straight), step_losses(run)
        assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]


def test_full_disk_under_two_processes_stops_both_at_once(tmp_path, sample_shards, straight):
    """The main process's failed save reaches the other rank at once (a broadcast after the save), so the job ends
    in seconds with the main process's line, not after train.stall_timeout_s with a stall."""
    checkpoint = sum(p.stat().st_size for p in (straight / "checkpoints" / "step_0000003").iterdir())
    with tmpfs(tmp_path / "disk", checkpoint * 135 // 100) as disk:
        run = disk / "run"
        started = time.monotonic()
        proc = launch(tiny_run(run, sample_shards, "train.batch_size=4", "train.stall_timeout_s=120"),
                      accelerate_config="cpu_ddp.yaml", cwd=tmp_path)
        took = time.monotonic() - started
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        assert "could not save checkpoint" in errors[0] and "No space left on device" in errors[0], errors
        assert "exitcode  : 2" in proc.stderr and "stall" not in proc.stderr
        assert took < 90, took  # start-up and 6 steps, far from the 120 s stall timeout
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]


def test_shards_on_a_full_disk_are_one_line_leave_nothing_half_written_and_keep_the_old_ones(tmp_path,
                                                                                             sample_shards):
    size = sum(p.stat().st_size for p in sample_shards.rglob("*") if p.is_file())
    prepare = ("prepare_data.py", "--source", "bundled:tinystories", "--tokenizer", str(TOKENIZER), "--workers", "1")
    # Room for one set of shards and half of another: the first prepare fits, a rebuild beside it does not.
    with tmpfs(tmp_path / "disk", size * 3 // 2) as disk:
        ok(script(*prepare, "--out", str(disk / "shards"), cwd=tmp_path))
        before = snapshot(disk / "shards")
        proc = script(*prepare, "--out", str(disk / "shards"), "--overwrite", cwd=tmp_path)
        one_line_error(proc, f"could not write token shards to {disk / 'shards'}: No space left on device (after ",
                       "of shards, now removed: ", f"the shards already in {disk / 'shards'} are kept",
                       "free space (or raise the quota) or choose another output directory")
        assert snapshot(disk / "shards") == before and sorted(p.name for p in disk.iterdir()) == ["shards"]
        ok(script("prepare_data.py", "--verify", str(disk / "shards"), cwd=tmp_path))
        # the trainer preparing its bundled data on a full disk: the same line, through the training entry point
        proc = train(tmp_path / "run", disk / "other", "data.source=bundled:tinystories", cwd=tmp_path)
        one_line_error(proc, f"could not write token shards to {disk / 'other'}: No space left on device")
        assert sorted(p.name for p in disk.iterdir()) == [".other.prepare.lock", "shards"]  # the lock is empty

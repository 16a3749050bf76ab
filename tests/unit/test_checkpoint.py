"""Checkpoints: safetensors round trip, atomic layout, retention, resume resolution, corrupt files, checksums,
interrupted prunes and full or read-only disks (a real size-limited tmpfs)."""

import contextlib
import hashlib
import json
import os
import random
import re
import stat
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_lm.config import ModelConfig
from dist_lm.errors import StorageError, UserError
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups
from dist_lm.train import checkpoint as checkpoint_module
from dist_lm.train.checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    load_model_weights,
    optimizer_from_tensors,
    optimizer_param_names,
    optimizer_to_tensors,
    remove_leftovers,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CFG = ModelConfig(vocab_size=64, seq_len=16, d_model=32, num_layers=2, num_heads=2)


def trained_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = TransformerLM(CFG)
    opt = AdamW(param_groups(model, 0.1), lr=1e-2)
    for _ in range(3):
        idx = torch.randint(0, 64, (2, 16))
        model(idx, idx).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(tmp_path, step, model, opt, keep_last=0):
    names = optimizer_param_names(opt, model)
    tensors, groups = optimizer_to_tensors(opt, names)
    return save_checkpoint(tmp_path, step, model.state_dict(), tensors, {"optimizer": groups}, keep_last=keep_last)


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 3, model, opt)
    assert path.name == "step_0000003"
    assert set(load_file(path / "model.safetensors")) == set(model.state_dict())  # plain safetensors, by name

    fresh, fresh_opt = trained_pair(seed=1)
    ckpt = load_checkpoint(path)
    load_model_weights(fresh, ckpt.model_state, path)
    names = optimizer_param_names(fresh_opt, fresh)
    optimizer_from_tensors(fresh_opt, names, ckpt.optimizer_tensors, ckpt.state["optimizer"], path)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    # The restored optimizer continues exactly like the original.
    idx = torch.randint(0, 64, (2, 16))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(idx, idx).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_retention_and_ordering(tmp_path):
    model, opt = trained_pair()
    for step in (100, 200, 300, 1000):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000300", "step_0001000"]
    assert not [p for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_find_checkpoint_takes_a_step_a_run_or_its_checkpoints_folder(tmp_path):
    model, opt = trained_pair()
    for step in (10, 20):
        save(tmp_path, step, model, opt)
    latest = tmp_path / CHECKPOINTS / "step_0000020"
    assert find_checkpoint(tmp_path) == latest and find_checkpoint(tmp_path / CHECKPOINTS) == latest
    assert find_checkpoint(tmp_path / CHECKPOINTS / "step_0000010").name == "step_0000010"
    with pytest.raises(FileNotFoundError, match=r"--ckpt .*nope does not exist; pass a step_\* directory"):
        find_checkpoint(tmp_path / "nope", "--ckpt")
    with pytest.raises(ValueError, match="state.json is a file, not a checkpoint directory"):
        find_checkpoint(latest / "state.json")


def test_half_written_checkpoint_is_ignored(tmp_path):
    model, opt = trained_pair()
    save(tmp_path, 10, model, opt)
    partial = tmp_path / CHECKPOINTS / ".tmp-step_0000020-123"  # what a crash mid-save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    (tmp_path / CHECKPOINTS / "step_0000030").mkdir()  # no state.json: not complete
    assert resolve_resume(tmp_path, "latest").name == "step_0000010"


def test_resume_resolution_errors(tmp_path):
    assert resolve_resume(tmp_path, "") is None
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "empty"))
    model, opt = trained_pair()
    save(tmp_path, 5, model, opt)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        resolve_resume(tmp_path, "")
    with pytest.raises(FileNotFoundError, match="try .*step_0000005"):
        resolve_resume(tmp_path, str(tmp_path))


def test_resume_auto_is_a_fresh_start_then_the_latest(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None  # a job's first start
    model, opt = trained_pair()
    for step in (5, 10):
        save(tmp_path, step, model, opt)
    assert resolve_resume(tmp_path, "auto").name == "step_0000010"  # every restart


def test_corrupt_files_give_one_clear_error(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 5, model, opt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt.*earlier checkpoint"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json is corrupt"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 5, model, opt)
    other = TransformerLM(ModelConfig(vocab_size=64, seq_len=16, d_model=48, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="does not fit the configured model"):
        load_model_weights(other, load_checkpoint(path).model_state, path)


def test_state_json_has_version_and_no_pickle(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 7, model, opt)
    state = json.loads((path / "state.json").read_text())
    assert state["format_version"] == 2 and state["step"] == 7
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]


@pytest.mark.skipif(os.name != "posix", reason="permission bits are a POSIX notion")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_checkpoint_files_get_the_umask_modes(tmp_path, umask):
    # A run directory shared with a group must stay readable to it: every file and directory of a checkpoint
    # gets what the umask gives a new file (0o666 & ~umask) or directory (0o777 & ~umask), no less, no more.
    model, opt = trained_pair()
    old = os.umask(umask)
    try:
        path = save(tmp_path / "run", 5, model, opt)
    finally:
        os.umask(old)
    dirs = [tmp_path / "run", tmp_path / "run" / CHECKPOINTS, path]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [*dirs, *path.iterdir()]}
    assert modes == {**{p.name: oct(0o777 & ~umask) for p in dirs},
                     **{f: oct(0o666 & ~umask) for f in ("model.safetensors", "optimizer.safetensors", "state.json")}}


def test_rng_state_round_trip_through_json():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    saved = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


# ----------------------------------------------------------------------------------------------
# Integrity: checksums in state.json, verified on every load path


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def scribble(path, count: int = 1000) -> None:
    """Random bytes over the middle of a file, its size unchanged: what bit rot or a bad copy does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = os.urandom(count)
    path.write_bytes(bytes(data))


def test_state_json_records_size_and_sha256_of_each_file(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 7, model, opt)
    files = json.loads((path / "state.json").read_text())["files"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        data = (path / name).read_bytes()
        assert files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_random_bytes_in_a_tensor_file_are_named_not_loaded(tmp_path, name):
    model, opt = trained_pair()
    save(tmp_path, 5, model, opt)
    path = save(tmp_path, 10, model, opt)
    scribble(path / name)
    load_file(path / name)  # the damage is of the kind safetensors itself cannot see: the file still parses
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert f"checkpoint file {path / name} is corrupt" in message and "sha256" in message
    assert "earlier checkpoint" in message and str(tmp_path / CHECKPOINTS / "step_0000005") in message
    if name == "model.safetensors":  # generation and export read the weights through the same check
        with pytest.raises(UserError, match="model.safetensors is corrupt"):
            load_model_state(path)
    else:  # the weights are intact and verified: generation need not read the optimizer's file
        assert set(load_model_state(path)) == set(model.state_dict())
    assert snapshot(tmp_path) == before  # nothing deleted or rewritten


def test_a_changed_size_is_named_and_a_version_2_state_must_have_checksums(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 5, model, opt)
    with open(path / "optimizer.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(UserError, match=r"optimizer.safetensors is corrupt \(it has [\d,]+ bytes, [\d,]+ when"):
        load_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="state.json is incomplete \\(no 'files'\\)"):
        load_checkpoint(path)


def test_version_1_checkpoint_loads_unverified_with_a_warning(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 5, model, opt)
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    state["format_version"] = 1
    (path / "state.json").write_text(json.dumps(state))
    with pytest.warns(RuntimeWarning, match="format_version 1, no checksums"):
        ckpt = load_checkpoint(path)
    assert all(torch.equal(ckpt.model_state[k], v) for k, v in model.state_dict().items())


def test_state_json_of_random_bytes_is_one_user_error(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 5, model, opt)
    (path / "state.json").write_bytes(os.urandom(200) + b"\xff")  # never valid UTF-8
    with pytest.raises(UserError, match=r"state.json is corrupt \(not UTF-8 text\)"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Incomplete checkpoints: skipped by resume=latest with a warning, never deleted


def test_resume_latest_skips_newer_incomplete_checkpoints_with_a_warning(tmp_path):
    model, opt = trained_pair()
    save(tmp_path, 10, model, opt)
    no_state = save(tmp_path, 20, model, opt)
    (no_state / "state.json").unlink()
    unreadable = save(tmp_path, 30, model, opt)
    (unreadable / "state.json").write_text('{"step": 30, "confi')
    with pytest.warns(RuntimeWarning) as caught:
        assert resolve_resume(tmp_path, "latest").name == "step_0000010"
    messages = [str(w.message) for w in caught]
    assert any(f"skips the incomplete checkpoint {no_state}: it has no state.json" in m for m in messages), messages
    assert any(f"{unreadable}: its state.json is not readable JSON" in m for m in messages), messages
    assert all("using the earlier step_0000010" in m for m in messages)
    with pytest.warns(RuntimeWarning, match="step_0000020"):  # generation picks the same one, and says so
        assert find_checkpoint(tmp_path / CHECKPOINTS).name == "step_0000010"
    assert no_state.is_dir() and unreadable.is_dir()


def test_resume_latest_with_only_incomplete_checkpoints_names_them(tmp_path):
    (tmp_path / CHECKPOINTS / "step_0000020").mkdir(parents=True)
    with pytest.warns(RuntimeWarning, match="step_0000020: it has no state.json"):
        with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
            resolve_resume(tmp_path, "latest")


def test_remove_leftovers_clears_crash_debris_and_only_warns_about_step_dirs(tmp_path):
    model, opt = trained_pair()
    kept = save(tmp_path, 10, model, opt)
    root = tmp_path / CHECKPOINTS
    tmp = root / ".tmp-step_0000020-77"  # a save killed mid-write
    old = root / ".old-step_0000005-77"  # a prune killed mid-delete
    for leftover in (tmp, old):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(os.urandom(100))
    user_dir = root / "step_0000030"  # no state.json: never resumed from, but maybe somebody's files
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match=f"{user_dir} has no state.json.*left as it is"):
        removed = remove_leftovers(tmp_path)
    assert sorted(removed) == sorted([tmp, old])
    assert sorted(p.name for p in root.iterdir()) == ["step_0000010", "step_0000030"]
    assert (user_dir / "notes.txt").read_text() == "mine" and load_checkpoint(kept).state["step"] == 10
    assert remove_leftovers(tmp_path / "no-run") == []


def test_a_prune_killed_mid_delete_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model, opt = trained_pair()
    save(tmp_path, 10, model, opt)
    real_rmtree = checkpoint_module.shutil.rmtree

    def killed(path, *args, **kwargs):  # the process dies after deleting one file of the old checkpoint
        path = type(tmp_path)(path)
        if path.name.startswith(".old-step_0000010") and path.exists():
            (path / "state.json").unlink(missing_ok=True)
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20, model, opt, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / CHECKPOINTS
    assert [p.name for p in root.iterdir() if p.name.startswith("step_")] == ["step_0000020"]
    assert resolve_resume(tmp_path, "latest").name == "step_0000020"
    assert [p.name.rsplit("-", 1)[0] for p in remove_leftovers(tmp_path)] == [".old-step_0000010"]
    assert [p.name for p in root.iterdir()] == ["step_0000020"]


# ----------------------------------------------------------------------------------------------
# Full or read-only disk: a real size-limited tmpfs


@contextlib.contextmanager
def tmpfs(directory, size_bytes: int):
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


def checkpoint_bytes(path):
    return sum(p.stat().st_size for p in path.iterdir())


def big_pair():
    """A model big enough that its checkpoint dwarfs a tmpfs's bookkeeping (about 1.6 MB)."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=2048, seq_len=16, d_model=64, num_layers=1, num_heads=2))
    opt = AdamW(param_groups(model, 0.1), lr=1e-2)
    idx = torch.randint(0, 2048, (2, 16))
    model(idx, idx).backward()
    opt.step()
    return model, opt


def test_full_disk_is_one_line_and_loses_nothing(tmp_path):
    model, opt = big_pair()
    need = checkpoint_bytes(save(tmp_path / "measure", 1, model, opt))
    with tmpfs(tmp_path / "disk", need + need // 2) as disk:  # the first checkpoint fits, a second does not
        first = save(disk / "run", 1, model, opt)
        before = snapshot(first)
        with pytest.raises(StorageError) as err:
            save(disk / "run", 2, model, opt)
        message = str(err.value)
        assert message.startswith(f"could not save checkpoint {disk / 'run' / CHECKPOINTS / 'step_0000002'}: "
                                  "No space left on device (")
        free, needs = re.search(r"\(([\d.]+) MiB free on that filesystem, the checkpoint needs about ([\d.]+) MiB\)",
                                message).groups()
        assert float(free) < float(needs) and abs(float(needs) * 2**20 - need) < 0.1 * need, (free, needs, need)
        assert "step_0000001, is kept" in message and "train.resume=latest" in message and "\n" not in message
        assert err.value.errno == 28
        assert [p.name for p in (disk / "run" / CHECKPOINTS).iterdir()] == ["step_0000001"]  # no .tmp-* left
        # A step saved again (a resumed run ending where it started) keeps the old copy when the new one fails.
        with pytest.raises(StorageError, match="step_0000001, is kept"):
            save(disk / "run", 1, model, opt)
        assert snapshot(first) == before and load_checkpoint(first).state["step"] == 1
        assert [p.name for p in (disk / "run" / CHECKPOINTS).iterdir()] == ["step_0000001"]


def test_read_only_disk_is_one_line(tmp_path):
    model, opt = big_pair()
    with tmpfs(tmp_path / "disk", 8 << 20) as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(StorageError) as err:
            save(disk / "run", 1, model, opt)
        assert str(err.value).startswith(f"could not save checkpoint {disk / 'run' / CHECKPOINTS / 'step_0000001'}: "
                                         "Read-only file system (")
        assert f"make {disk / 'run' / CHECKPOINTS} writable" in str(err.value)
        assert "no earlier checkpoint of this run exists" in str(err.value)

"""Checkpoints: safetensors round trip, atomic layout, retention, resume resolution, corrupt files."""

import json
import os
import random
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_lm.config import ModelConfig
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups
from dist_lm.train.checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    optimizer_from_tensors,
    optimizer_param_names,
    optimizer_to_tensors,
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
    assert state["format_version"] == 1 and state["step"] == 7
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

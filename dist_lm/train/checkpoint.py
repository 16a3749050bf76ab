"""Checkpoints: safetensors for tensors, JSON for everything else; atomic, checksummed, with retention.

Layout:
    run_dir/checkpoints/step_0000100/
        model.safetensors       the model's parameters, by name (loadable with safetensors alone)
        optimizer.safetensors   AdamW state, `<param name>.exp_avg` / `.exp_avg_sq` / `.step`
        state.json              format version, step, schedule position, data position, RNG states,
                                optimizer hyperparameters, config, tokenizer fingerprint, MLflow run id,
                                and `files`: {name: {"bytes": n, "sha256": hex}} of the two tensor files

Design decisions:
- No pickle: a checkpoint is safe to load from anyone, and readable from other tools.
- A checkpoint is written to a hidden temporary directory and renamed into place, so a crash
  mid-save leaves the previous checkpoint intact and no half-written `step_*` directory. A
  directory counts as a checkpoint only if it holds state.json, written last.
- Names sort by step (`step_0000100`), so the latest is the last in name order.
- Optimizer state is keyed by parameter name, not by position, so a checkpoint survives a change
  in how parameters are grouped and can be checked against the model it is loaded into.
- Integrity: state.json records each tensor file's size and SHA-256, and every reader (resume, generation,
  export) checks them before parsing a tensor. Random bytes inside a safetensors file parse fine and would
  surface much later as a NaN loss or nonsense text; here they are one error naming the file. SHA-256 rather
  than blake2b: hashlib's is as fast here (1.3 GB/s vs 1.0 on the 2-core VM, about a second per GB of
  checkpoint at save and at load), and `sha256sum` can check a file by hand. The checksums live in state.json,
  not in a separate manifest, because state.json is already written last: its presence still means "complete",
  with no second marker to keep consistent. state.json itself carries no checksum of its own, so a user may
  edit it (an MLflow run id, a path); bytes that break its JSON are caught when it is parsed.
- FORMAT_VERSION 2 added `files`; version-1 checkpoints (no checksums) still load, unverified, with one
  warning. A version-2 state.json without `files` is refused rather than read unverified.
- A failed save (full disk, quota, read-only or forbidden directory) removes its temporary directory and
  raises StorageError: one line with the path, the free space, about how much the checkpoint needed, the
  latest intact checkpoint and the fix. Nothing earlier is touched before the new checkpoint is complete; a
  step saved again swaps the old copy out only after the new one is written, and puts it back if the swap fails.
- Pruning first renames an old checkpoint to a hidden `.old-step_*` directory (one atomic step), then deletes
  it, so a kill mid-delete never leaves a half-deleted `step_*` that looks complete; `remove_leftovers` clears
  such `.old-*` and `.tmp-*` directories at start-up. A `step_*` directory without state.json is never deleted
  by this module's clean-up (it may hold something a user wants) and never resumed from: `train.resume=latest`
  skips it, and one with an unreadable state.json, with a warning that names it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_lm.errors import StorageError, UserError
from dist_lm.storage import SPACE_ERRNOS, format_bytes, free_space, storage_errno
from dist_lm.warn import warn_once

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no `files` checksums
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TMP_PREFIX, OLD_PREFIX = ".tmp-step_", ".old-step_"  # leftovers of an interrupted save / prune
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "step")
# state.json keys each reader needs: generation and export read the config, a resume reads the rest too
INFERENCE_KEYS = ("step", "config", "tokenizer_fingerprint")
RESUME_KEYS = (*INFERENCE_KEYS, "optimizer", "data", "rng")
_HASH_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def _step_dirs(run_dir: str | Path) -> list[Path]:
    """Every step_* directory of a run, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir()) if root.is_dir() else []


def _why_incomplete(path: Path) -> str | None:
    """None for a directory whose state.json is there and parses, else what is wrong with it."""
    file = path / STATE_FILE
    if not file.is_file():
        return f"it has no {STATE_FILE} (a save or a prune was interrupted, or files were removed)"
    try:
        state = json.loads(file.read_bytes())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        state = None
    return None if isinstance(state, dict) else f"its {STATE_FILE} is not readable JSON"


def _latest_complete(run_dir: str | Path, purpose: str) -> Path | None:
    """The newest checkpoint whose state.json reads; each newer step_* directory skipped is named in a warning
    (RuntimeWarning, main rank only), so going back to an older checkpoint never happens without a word."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(_step_dirs(run_dir)):
        why = _why_incomplete(path)
        if why is None:
            for bad, reason in skipped:
                warn_once(f"{purpose} skips the incomplete checkpoint {bad}: {reason}; using the earlier "
                          f"{path.name}")
            return path
        skipped.append((path, why))
    for bad, reason in skipped:
        warn_once(f"{purpose} skips the incomplete checkpoint {bad}: {reason}")
    return None


def find_checkpoint(path: str | Path, name: str = "checkpoint") -> Path:
    """The checkpoint directory a user means: a step_* directory as it is, a run directory (or its checkpoints/
    folder) as its latest complete checkpoint. A path that does not exist or is a file is one clear error, before
    any reader's "has no state.json" sends someone with a typo looking for a file. `name`: how the path is named in
    that error (a script's flag, e.g. "--checkpoint")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} {path} does not exist; pass a step_* directory or a run directory "
                                "(e.g. runs/demo)")
    if not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a checkpoint directory; pass a step_* directory or a run "
                        "directory")
    found = _latest_complete(path.parent if path.name == CHECKPOINTS else path, f"{name} {path}")
    return found or path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, else a checked directory.

    A fresh start into a run_dir that already holds checkpoints is refused, so nothing is overwritten.
    `latest` is the newest complete checkpoint; newer incomplete ones are skipped with a warning naming them.
    `auto` is `latest` when there is one, else a fresh start.
    """
    existing = list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise UserError(f"{run_dir} already holds checkpoints (latest {existing[-1].name}); pass "
                            "train.resume=latest to continue that run, or set name=/run_dir= to start a new one")
        return None
    if resume == "auto":  # the same command for a job's first start and every restart (a requeued SLURM job)
        return _latest_complete(run_dir, "train.resume=auto")
    if resume == "latest":
        latest = _latest_complete(run_dir, "train.resume=latest")
        if latest is None:
            raise FileNotFoundError(f"train.resume=latest but {Path(run_dir) / CHECKPOINTS} holds no checkpoint "
                                    f"(no step_* directory with a readable {STATE_FILE}); start fresh with "
                                    "train.resume='' or point train.resume at a step_* directory")
        return latest
    path = Path(resume)
    later = [p for p in existing if p.name > path.name]
    if path.resolve().parent == (Path(run_dir) / CHECKPOINTS).resolve() and later:
        raise UserError(f"{run_dir} holds checkpoints after {path.name} (up to {later[-1].name}); resuming from "
                        f"{path.name} here would mix two runs: delete the later ones, or resume into a new run_dir")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass train.resume=latest or an "
                                "existing run_dir/checkpoints/step_* directory")
    if not (path / STATE_FILE).is_file():
        found = list_checkpoints(path)
        hint = f" (it is a run directory: try {found[-1]})" if found else ""
        raise FileNotFoundError(f"{path} is not a checkpoint: it has no {STATE_FILE}{hint}; pass a step_* directory")
    return path


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what crashed saves and prunes left under run_dir/checkpoints (`.tmp-step_*`, `.old-step_*`); returns
    what was removed. Call it at start-up, on the main process only, before the first save.

    A `step_*` directory without state.json is only warned about: it is never resumed from, but it may hold files
    a user wants, and deleting a directory with a checkpoint's name is not this function's call.
    """
    root = Path(run_dir) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:  # housekeeping: the run can go on with the leftover in place
                warn_once(f"could not remove {path}, left by an earlier crash ({exc.strerror}); delete it by hand")
                continue
            removed.append(path)
        elif path.name.startswith("step_") and path.is_dir() and not (path / STATE_FILE).is_file():
            warn_once(f"{path} has no {STATE_FILE}: an incomplete checkpoint from an earlier crash, never resumed "
                      "from; it was left as it is: delete it unless something in it is needed")
    return removed


# ----------------------------------------------------------------------------------------------
# Saving


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Elsewhere the only way is to set it and put it back; another thread creating a file in between would
    # get mode 0o022's permissions, the common default, for that one file.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """save_file, leaving the file with the mode any new file of the process gets (0o666 minus the umask).

    safetensors 0.8 writes through a temporary file that is created 0600 and renamed into place (safetensors
    PR #764, issue #782), so without the chmod a checkpoint or export is unreadable to the group the run
    directory is shared with. Harmless where safetensors already respects the umask.
    """
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def file_record(path: str | Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in chunks (a checkpoint may not fit twice in memory)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], state: dict[str, Any], *, keep_last: int = 0) -> Path:
    """Write run_dir/checkpoints/step_<step>/ atomically and prune old checkpoints; returns its path.

    Raises StorageError (nothing left behind, every earlier checkpoint intact) when the disk is full or the
    directory cannot be written.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    files = {MODEL_FILE: _on_cpu(model_state), OPTIMIZER_FILE: _on_cpu(optimizer_tensors)}
    try:
        tmp = _write_temporary(root, final.name, files, {"format_version": FORMAT_VERSION, "step": step, **state})
    except (OSError, SafetensorError) as exc:
        code = storage_errno(exc)
        if code is None:
            raise
        raise _storage_error(code, final, files) from None
    _publish(tmp, final)
    if keep_last > 0:
        _prune(list_checkpoints(run_dir)[:-keep_last])
    return final


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _write_temporary(root: Path, name: str, files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]
                     ) -> Path:
    """The complete checkpoint in a hidden directory (removed again if anything fails, Ctrl-C included)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-save; never a complete checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        records = {}
        for file, tensors in files.items():
            save_tensors(tensors, tmp / file)
            records[file] = file_record(tmp / file)  # read back from the page cache: what the disk was given
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": records}, indent=1))
        for f in tmp.iterdir():  # durable before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place, durably. A step saved before (a resumed run ending
    where it started) is swapped out only now, and put back if the swap fails."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier process with the same pid
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _prune(stale: list[Path]) -> None:
    """Delete old checkpoints: renamed out of the step_* namespace first (atomic), then removed, so a kill in
    between leaves a `.old-step_*` leftover (cleared by remove_leftovers), never a half-deleted step_*."""
    for path in stale:
        trash = path.with_name(f".old-{path.name}-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)  # a leftover of an earlier process with the same pid
        os.replace(path, trash)
        shutil.rmtree(trash)


def _storage_error(code: int, final: Path, files: dict[str, dict[str, torch.Tensor]]) -> StorageError:
    """One line: what failed where, the free space against the need, what is still intact, and the fix."""
    root = final.parent
    run_dir = root.parent
    needed = sum(t.nelement() * t.element_size() for tensors in files.values() for t in tensors.values())
    kept = list_checkpoints(run_dir)
    intact = (f"the latest intact checkpoint, {kept[-1].name}, is kept" if kept
              else "no earlier checkpoint of this run exists")
    fix = ("free space (or raise the quota) or point run_dir elsewhere" if code in SPACE_ERRNOS
           else f"make {root} writable or point run_dir elsewhere")
    error = StorageError(f"could not save checkpoint {final}: {os.strerror(code)} ({free_space(root)} free on "
                         f"that filesystem, the checkpoint needs about {format_bytes(needed)}); {intact}; {fix} "
                         f"(moving {run_dir} there), then continue with train.resume=latest")
    error.errno = code  # str() stays the one line: OSError adds "[Errno N] ..." only once strerror or filename is set
    return error


# ----------------------------------------------------------------------------------------------
# Loading (every path checks the files against state.json before parsing them)


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def load_state(path: str | Path, required: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """state.json of a checkpoint directory, checked for its format version and the `required` keys."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: it has no {STATE_FILE}; pass a step_* directory")
    try:
        state = json.loads(file.read_bytes())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{file} is corrupt ({detail}); {_earlier_fix(path)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} is corrupt (a JSON {type(state).__name__}, not an object); {_earlier_fix(path)}")
    if state.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{file} has format_version {state.get('format_version')!r}; this dist_lm reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in (*required, *(("files",) if state["format_version"] >= 2 else ())) if k not in state]
    if missing:
        raise UserError(f"{file} is incomplete (no {missing[0]!r}); {_earlier_fix(path)}")
    return state


def _earlier_fix(path: Path) -> str:
    """The advice for a damaged checkpoint: the earlier checkpoint to go back to, named, if there is one."""
    root = path.parent
    earlier = [p for p in list_checkpoints(root.parent) if p.name < path.name] if root.name == CHECKPOINTS else []
    if not earlier:
        return ("there is no earlier checkpoint to go back to: restore the file from a copy, or start a new run "
                "(nothing was deleted)")
    return (f"use the earlier checkpoint {earlier[-1]}: move {path} out of {root} (nothing was deleted) and "
            f"train.resume=latest continues from {earlier[-1].name}")


def verify_file(file: Path, state: dict[str, Any]) -> None:
    """Check a checkpoint file against the size and SHA-256 state.json recorded when it was saved (format 2);
    a version-1 checkpoint has none and is loaded as it is, with a warning."""
    if "files" not in state:
        warn_once(f"{file.parent} was saved by an older dist_lm (state.json format_version 1, no checksums): "
                  "its files are loaded unverified")
        return
    record = state["files"].get(file.name) if isinstance(state["files"], dict) else None
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
        raise UserError(f"{file.parent / STATE_FILE} records no checksum for {file.name}; "
                        f"{_earlier_fix(file.parent)}")
    size = file.stat().st_size
    if size != record["bytes"]:
        raise UserError(f"checkpoint file {file} is corrupt (it has {size:,} bytes, {record['bytes']:,} when it was "
                        f"saved); {_earlier_fix(file.parent)}")
    actual = file_record(file)["sha256"]
    if actual != record["sha256"]:
        raise UserError(f"checkpoint file {file} is corrupt (its sha256 is {actual[:16]}..., {record['sha256'][:16]}"
                        f"... when it was saved: its bytes changed on disk); {_earlier_fix(file.parent)}")


def _load_tensors(file: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; {_earlier_fix(file.parent)}")
    verify_file(file, state)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"checkpoint file {file} is corrupt ({exc}); {_earlier_fix(file.parent)}") from None


def load_model_state(path: str | Path, state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Only the weights (for generation and export), verified against state.json (`state`, if already read)."""
    path = Path(path)
    return _load_tensors(path / MODEL_FILE, load_state(path) if state is None else state)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("step",)) -> Checkpoint:
    path = Path(path)
    state = load_state(path, required)
    return Checkpoint(path, _load_tensors(path / MODEL_FILE, state), _load_tensors(path / OPTIMIZER_FILE, state),
                      state)


def load_model_weights(model: torch.nn.Module, model_state: dict[str, torch.Tensor], source: Path | str) -> None:
    """load_state_dict with an error that says which checkpoint does not fit which model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    bad_shape = [k for k in expected if k in model_state and expected[k].shape != model_state[k].shape]
    if missing or unexpected or bad_shape:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{bad_shape[0]} has shape {tuple(model_state[bad_shape[0]].shape)}, the model "
                       f"{tuple(expected[bad_shape[0]].shape)}")
        raise UserError(f"checkpoint {source} does not fit the configured model ({detail}); use the config "
                        "stored in the checkpoint's state.json")
    model.load_state_dict(model_state)


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> named tensors


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """Names of the optimizer's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (DTensor) is all-gathered, a collective every rank must call."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def model_state_full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with every sharded tensor gathered, on the CPU (collective under FSDP2).

    Checkpoints are always consolidated: a run saved on N GPUs resumes on any number of them, and its
    model.safetensors loads on one GPU or the CPU with nothing but safetensors.
    """
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, param_names: list[str]
                         ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(tensors keyed '<param>.<key>', param-group hyperparameters with param names) of an optimizer;
    sharded state is gathered (collective under FSDP2)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            value = full_tensor(value).detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{param_names[index]}.{key}"] = value
    groups = []
    for group in sd["param_groups"]:
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        meta["param_names"] = [param_names[i] for i in group["params"]]
        groups.append(meta)
    return tensors, groups


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, param_names: list[str],
                           tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]], source: Path | str) -> None:
    """Inverse of optimizer_to_tensors; checks that the checkpoint's parameters are the optimizer's."""
    saved_names = [n for g in groups for n in g["param_names"]]
    if sorted(saved_names) != sorted(param_names) or len(groups) != len(optimizer.param_groups):
        raise UserError(f"optimizer state in {source} is for other parameters than the model's; use the config "
                        "stored in the checkpoint's state.json")
    index = {name: i for i, name in enumerate(param_names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name in saved_names:
        entry = {k: _like_param(tensors[f"{name}.{k}"], params[index[name]]) for k in _OPTIM_KEYS
                 if f"{name}.{k}" in tensors}
        if entry:
            state[index[name]] = entry
    param_groups = []
    for group in groups:
        g = {k: (tuple(v) if k == "betas" else v) for k, v in group.items() if k != "param_names"}
        g["params"] = [index[n] for n in group["param_names"]]
        param_groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full moment tensor sharded like its FSDP2 parameter (every rank read the same file, so each
    takes its own shard locally: no communication); plain tensors and scalars pass through."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


# ----------------------------------------------------------------------------------------------
# RNG states as JSON


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and current CUDA device) RNG states, JSON-serialisable."""
    np_state = np.random.get_state()
    out = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tupled(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x

"""Checkpoints: safetensors for tensors, JSON for everything else; atomic, with retention.

Layout:
    run_dir/checkpoints/step_0000100/
        model.safetensors       the model's parameters, by name (loadable with safetensors alone)
        optimizer.safetensors   AdamW state, `<param name>.exp_avg` / `.exp_avg_sq` / `.step`
        state.json              format version, step, schedule position, data position, RNG states,
                                optimizer hyperparameters, config, tokenizer fingerprint, MLflow run id

Design decisions:
- No pickle: a checkpoint is safe to load from anyone, and readable from other tools.
- A checkpoint is written to a hidden temporary directory and renamed into place, so a crash
  mid-save leaves the previous checkpoint intact and no half-written `step_*` directory. A
  directory counts as a checkpoint only if it holds state.json, written last.
- Names sort by step (`step_0000100`), so the latest is the last in name order.
- Optimizer state is keyed by parameter name, not by position, so a checkpoint survives a change
  in how parameters are grouped and can be checked against the model it is loaded into.
"""

from __future__ import annotations

import base64
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

from dist_lm.errors import UserError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "step")
# state.json keys each reader needs: generation and export read the config, a resume reads the rest too
INFERENCE_KEYS = ("step", "config", "tokenizer_fingerprint")
RESUME_KEYS = (*INFERENCE_KEYS, "optimizer", "data", "rng")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def find_checkpoint(path: str | Path, name: str = "checkpoint") -> Path:
    """The checkpoint directory a user means: a step_* directory as it is, a run directory (or its checkpoints/
    folder) as its latest checkpoint. A path that does not exist or is a file is one clear error, before any
    reader's "has no state.json" sends someone with a typo looking for a file. `name`: how the path is named in
    that error (a script's flag, e.g. "--checkpoint")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} {path} does not exist; pass a step_* directory or a run directory "
                                "(e.g. runs/demo)")
    if not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a checkpoint directory; pass a step_* directory or a run "
                        "directory")
    found = list_checkpoints(path.parent if path.name == CHECKPOINTS else path)
    return found[-1] if found else path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, else a checked directory.

    A fresh start into a run_dir that already holds checkpoints is refused, so nothing is overwritten.
    """
    existing = list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise UserError(f"{run_dir} already holds checkpoints (latest {existing[-1].name}); pass "
                            "train.resume=latest to continue that run, or set name=/run_dir= to start a new one")
        return None
    if resume == "latest":
        if not existing:
            raise FileNotFoundError(f"train.resume=latest but {Path(run_dir) / CHECKPOINTS} holds no checkpoint; "
                                    "start fresh with train.resume='' or point train.resume at a step_* directory")
        return existing[-1]
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


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], state: dict[str, Any], *, keep_last: int = 0) -> Path:
    """Write run_dir/checkpoints/step_<step>/ atomically and prune old checkpoints; returns its path."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-save; never a complete checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_tensors(cpu, tmp / MODEL_FILE)
    save_tensors({k: v.detach().to("cpu").contiguous() for k, v in optimizer_tensors.items()}, tmp / OPTIMIZER_FILE)
    state = {"format_version": FORMAT_VERSION, "step": step, **state}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():  # durable before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (e.g. a resumed run ending where it started): swap, then delete
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(stale)
    return final


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing; resume from another checkpoint")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"checkpoint file {path} is corrupt ({exc}); delete {path.parent} and resume from an "
                        "earlier checkpoint") from None


def load_state(path: str | Path, required: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """state.json of a checkpoint directory, checked for its format version and the `required` keys."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: it has no {STATE_FILE}; pass a step_* directory")
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is corrupt ({exc.msg}); delete {path} and resume from an earlier "
                        "checkpoint") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file} has format_version {state.get('format_version')!r}; this dist_lm reads "
                        f"{FORMAT_VERSION}")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{file} is incomplete (no {missing[0]!r}); delete {path} and resume from an earlier "
                        "checkpoint")
    return state


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the weights (for generation and export)."""
    return _load_tensors(Path(path) / MODEL_FILE)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("step",)) -> Checkpoint:
    path = Path(path)
    state = load_state(path, required)
    return Checkpoint(path, _load_tensors(path / MODEL_FILE), _load_tensors(path / OPTIMIZER_FILE), state)


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

"""What a run records about where it ran: the code's git commit (and whether it had uncommitted changes), the
device, and the processes; tags of the MLflow run, set again by each attempt of a resumed run.

Design decisions:
- The commit is the one of the checkout `dist_lm` is imported from, not of the working directory: a user may
  launch from anywhere. An installed (non-editable) package has no checkout; the version number is recorded then.
- "dirty" counts tracked files only: a run directory or data inside the checkout is not a change of the code.
- MLflow's own tag `mlflow.source.git.commit` is set too, so its UI shows the commit where it shows it for its own
  runs.
- git is asked with a short timeout and its absence is not an error: provenance must never stop a run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

import dist_lm

GIT_TIMEOUT_S = 5.0


def _git(checkout: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):  # no git here, or a hung filesystem: record less, train anyway
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_tags(package_dir: Path | None = None) -> dict[str, str]:
    """{"git_commit", "git_dirty", "mlflow.source.git.commit"} of the checkout holding dist_lm, else
    {"dist_lm_version"} for an installed package."""
    checkout = (package_dir or Path(dist_lm.__file__).resolve().parent).parent
    commit = _git(checkout, "rev-parse", "HEAD") if (checkout / ".git").exists() else None
    if commit is None:
        return {"dist_lm_version": getattr(dist_lm, "__version__", "unknown")}
    changes = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if changes is None else str(bool(changes)).lower()
    return {"git_commit": commit, "git_dirty": dirty, "mlflow.source.git.commit": commit}


def processes_per_machine(num_processes: int) -> int:
    """How many processes the launcher started on each machine (its LOCAL_WORLD_SIZE; all of them without one)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or num_processes))


def device_tags(device: torch.device, num_processes: int) -> dict[str, str]:
    """The accelerator's name (the main process's), and how many processes on how many machines."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "num_processes": str(num_processes),
            "num_machines": str(max(1, num_processes // processes_per_machine(num_processes)))}

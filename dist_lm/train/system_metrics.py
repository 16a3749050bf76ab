"""System metrics from every node (`tracking.system_metrics`): host CPU and memory, and each local GPU's
utilisation and memory, logged beside the run's metrics at each log step as `system/<node>/<what>`.

Design decisions:
- The node's local main process reads the host (CPU, memory); every process reads its own GPU only (so no process
  opens a CUDA context on another's GPU), named by its index on the node. GPU memory comes from cudaMemGetInfo
  (every process on the GPU counts, as nvidia-smi shows); utilisation from NVML through torch.cuda.utilization
  when pynvml is installed, left out otherwise.
- Sampled at the log step, not by a thread: CPU percent is psutil's average since its previous call, i.e. over
  the log interval; nothing runs between log steps.
- The figures reach the main process (the only one that talks to MLflow) through one gather over the gloo group
  the stop check uses (CPU objects: no device sync), once per log interval and only when the option is on.
- A node is named as SLURM names it (SLURMD_NODENAME), else by its host name, with the machine rank appended when two
  machines share a name (containers), so every metric says where it comes from.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

GIB = 1024**3


def host_figures() -> dict[str, float]:
    """This node's CPU percent (since the previous call) and memory."""
    import psutil

    mem = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "memory_used_GiB": (mem.total - mem.available) / GIB,
            "memory_percent": mem.percent}


def gpu_figures(device: torch.device, local_index: int) -> dict[str, float]:
    """This process's own GPU (named by its index on the node): memory used by every process on it, and NVML's
    utilisation where pynvml is installed. Never raises: a figure the driver will not give (MIG, no NVML) is left
    out, since a metric must not stop a run, nor leave the other ranks waiting in the gather."""
    out = {}
    try:
        free, total = torch.cuda.mem_get_info(device)  # this process's device: no context on another GPU
        out[f"gpu{local_index}_memory_used_GiB"] = (total - free) / GIB
    except Exception:  # noqa: BLE001 (see the docstring)
        pass
    try:
        out[f"gpu{local_index}_utilization_percent"] = float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 (no pynvml, NVML not supported here: memory only)
        pass
    return out


class SystemMetrics:
    """Collects every node's figures on the main process; see the module docstring. Every process calls
    `collect()` at the same steps (it is a collective when there are several processes)."""

    def __init__(self, *, group: object | None, is_main: bool, is_local_main: bool, machine_rank: int,
                 local_index: int = 0, device: torch.device | None = None) -> None:
        self.group = group
        self.is_main = is_main
        self.is_local_main = is_local_main
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # SLURM's name for the node
        self.machine_rank = machine_rank
        self.local_index = local_index
        self.device = device if device is not None and device.type == "cuda" else None
        if is_local_main:
            host_figures()  # psutil's CPU percent counts from its first call: start the first interval now

    def sample(self) -> dict[str, float]:
        """This process's share: the host's figures (the node's local main process) and its own GPU's."""
        out = host_figures() if self.is_local_main else {}
        if self.device is not None:
            out.update(gpu_figures(self.device, self.local_index))
        return out

    def collect(self) -> dict[str, float]:
        """{"system/<node>/<what>": value} for every node, on the main process ({} elsewhere)."""
        mine = (self.node, self.machine_rank, self.sample())
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if self.is_main else None
            dist.gather_object(mine, gathered, dst=0, group=self.group)
        else:
            gathered = [mine]
        if not self.is_main:
            return {}
        machines_by_name: dict[str, set[int]] = {}
        for name, machine, _ in gathered:
            machines_by_name.setdefault(name, set()).add(machine)
        out = {}
        for name, machine, figures in gathered:
            label = name if len(machines_by_name[name]) == 1 else f"{name}-{machine}"
            out.update({f"system/{label}/{k}": v for k, v in figures.items()})
        return out

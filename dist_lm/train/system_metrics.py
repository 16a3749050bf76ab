"""System metrics from every node (`tracking.system_metrics`): host CPU and memory, and each local GPU's
utilisation and memory, logged beside the run's metrics at each log step as `system/<node>/<what>`.

Design decisions:
- One process per node samples, the node's local main process: host figures are the node's, and each local GPU is
  read by index from there. GPU memory comes from cudaMemGetInfo (every process on the GPU counts, as nvidia-smi
  shows); utilisation from NVML through torch.cuda.utilization when pynvml is installed, left out otherwise.
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


def sample_node(cuda: bool) -> dict[str, float]:
    """This node's figures now: CPU percent (since the previous call), memory, and each local GPU's memory and
    utilisation."""
    import psutil

    mem = psutil.virtual_memory()
    out = {"cpu_percent": psutil.cpu_percent(interval=None), "memory_used_GiB": (mem.total - mem.available) / GIB,
           "memory_percent": mem.percent}
    if cuda:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out[f"gpu{i}_memory_used_GiB"] = (total - free) / GIB
            try:
                out[f"gpu{i}_utilization_percent"] = float(torch.cuda.utilization(i))
            except (ModuleNotFoundError, RuntimeError):  # no pynvml / NVML here: memory only
                pass
    return out


class SystemMetrics:
    """Collects every node's figures on the main process; see the module docstring. Every process calls
    `collect()` at the same steps (it is a collective when there are several processes)."""

    def __init__(self, *, group: object | None, is_main: bool, is_local_main: bool, machine_rank: int,
                 cuda: bool) -> None:
        self.group = group
        self.is_main = is_main
        self.is_local_main = is_local_main
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # SLURM's name for the node
        self.machine_rank = machine_rank
        self.cuda = cuda
        if is_local_main:
            sample_node(cuda)  # psutil's CPU percent counts from its first call: start the first interval now

    def collect(self) -> dict[str, float]:
        """{"system/<node>/<what>": value} for every node, on the main process ({} elsewhere)."""
        mine = (self.node, self.machine_rank, sample_node(self.cuda)) if self.is_local_main else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if self.is_main else None
            dist.gather_object(mine, gathered, dst=0, group=self.group)
        else:
            gathered = [mine]
        if not self.is_main:
            return {}
        nodes = [g for g in gathered if g is not None]
        names = [name for name, _, _ in nodes]
        out = {}
        for name, machine, figures in nodes:
            label = name if names.count(name) == 1 else f"{name}-{machine}"
            out.update({f"system/{label}/{k}": v for k, v in figures.items()})
        return out

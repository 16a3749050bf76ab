"""System metrics (dist_lm.train.system_metrics): one process's node figures, named by the node."""

import socket

import psutil
import pytest
import torch

from dist_lm.train.system_metrics import SystemMetrics, gpu_figures, host_figures


def test_a_node_reports_cpu_and_memory_and_no_gpu_without_cuda():
    figures = host_figures()
    assert set(figures) == {"cpu_percent", "memory_used_GiB", "memory_percent"}
    assert 0 <= figures["cpu_percent"] <= 100 * psutil.cpu_count()
    total = psutil.virtual_memory().total / 1024**3
    assert 0 < figures["memory_used_GiB"] < total and 0 < figures["memory_percent"] < 100


@pytest.mark.parametrize("slurm_name", [None, "n7"])
def test_metrics_are_labelled_by_the_slurm_node_else_the_host(monkeypatch, slurm_name):
    if slurm_name:
        monkeypatch.setenv("SLURMD_NODENAME", slurm_name)
    else:
        monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    collector = SystemMetrics(group=None, is_main=True, is_local_main=True, machine_rank=0)
    node = slurm_name or socket.gethostname()
    assert set(collector.collect()) == {f"system/{node}/{k}" for k in ("cpu_percent", "memory_used_GiB",
                                                                        "memory_percent")}


def test_only_the_main_process_returns_figures():
    other = SystemMetrics(group=None, is_main=False, is_local_main=True, machine_rank=1)
    assert other.collect() == {}


def test_a_gpu_figure_the_driver_cannot_give_is_left_out_not_raised():
    """What a rank without CUDA (or with NVML refusing) gets: no figures, and no exception that would leave the other
    ranks waiting in the gather."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert gpu_figures(torch.device("cuda", 0), 0) == {}

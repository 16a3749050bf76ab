"""The Accelerate launcher configs of benchmarks/bench_scaling.py's runs: one YAML per run, checked through
Accelerate's own loader before anything launches, and a free rendezvous port for each."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

TOPOLOGIES = ("single", "ddp", "fsdp")
BASE_PORT = 29610  # only written into the YAMLs that --part table / the config check never launch


def free_port() -> int:
    """A TCP port nobody listens on now, for one run's rendezvous: fixed ports collide with another benchmark or
    test on the same host, or with a just-closed rendezvous lingering in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(topology: str, *, num_processes: int, port: int, hf: bool = False, cpu: bool = False,
                      regional_compile: bool = False, reshard_after_forward: bool = True) -> dict:
    """The accelerate YAML (as a dict) for one run. `hf` picks Accelerate's own auto-wrap for FSDP2."""
    cfg: dict = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
                 "num_processes": num_processes, "mixed_precision": "no" if cpu else "bf16", "gpu_ids": "all"}
    if topology == "single":
        if num_processes != 1:
            raise ValueError(f"topology single runs 1 process, not {num_processes}")
        cfg["distributed_type"] = "NO"
    elif cpu:  # torchrun + gloo: Accelerate's MULTI_CPU would go through MPI (configs/accelerate/cpu_ddp.yaml)
        cfg.update(distributed_type="MULTI_GPU", use_cpu=True, main_process_port=port)
    elif topology == "ddp":
        cfg.update(distributed_type="MULTI_GPU", main_process_port=port)
    elif topology == "fsdp":
        fsdp = {"fsdp_version": 2, "fsdp_reshard_after_forward": reshard_after_forward,
                "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
                "fsdp_activation_checkpointing": False}
        if hf:  # Accelerate shards each decoder layer (its auto-wrap), then embeddings, head and root
            fsdp.update(fsdp_auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                        fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer")
        else:  # dist_lm.parallel.apply_fsdp shards the blocks itself (configs/accelerate/fsdp.yaml)
            fsdp["fsdp_auto_wrap_policy"] = "NO_WRAP"
        cfg.update(distributed_type="FSDP", fsdp_config=fsdp, main_process_port=port)
    else:
        raise ValueError(f"topology {topology!r} is unknown; choose from {TOPOLOGIES}")
    if regional_compile:
        cfg["dynamo_config"] = {"dynamo_backend": "INDUCTOR", "dynamo_use_regional_compilation": True}
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    """Write the YAML and read it back through Accelerate's own loader, so a wrong key fails here, not mid-run."""
    from accelerate.commands.config.config_args import load_config_from_file

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    loaded = load_config_from_file(str(path))
    got = {"distributed_type": getattr(loaded.distributed_type, "value", loaded.distributed_type),
           "num_processes": loaded.num_processes,
           "mixed_precision": getattr(loaded.mixed_precision, "value", loaded.mixed_precision)}
    want = {"distributed_type": cfg["distributed_type"], "num_processes": cfg["num_processes"],
            "mixed_precision": cfg["mixed_precision"]}
    if got != want or (loaded.fsdp_config or {}) != cfg.get("fsdp_config", {}):
        raise ValueError(f"{path}: Accelerate read {got} / {loaded.fsdp_config}, written {want} / "
                         f"{cfg.get('fsdp_config')}")
    return path

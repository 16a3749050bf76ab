"""train.deterministic's switches: what they set, that they come back, and the attention config they fix."""

import os

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.utils.deterministic

from dist_lm.kernels import flash_attention
from dist_lm.train.determinism import CUBLAS_DETERMINISTIC, deterministic


def test_deterministic_block_sets_every_switch_and_restores_them_even_after_an_error(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), flash_attention._autotune, inductor_config.deterministic,
              torch.utils.deterministic.fill_uninitialized_memory)
    assert before == (False, True, False, True)
    with pytest.raises(KeyError), deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert not flash_attention._autotune  # our attention runs fixed configs, not the timed pick
        assert inductor_config.deterministic
        assert not torch.utils.deterministic.fill_uninitialized_memory  # no NaN write of every new buffer
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
        raise KeyError("a failing run")
    assert (torch.are_deterministic_algorithms_enabled(), flash_attention._autotune, inductor_config.deterministic,
            torch.utils.deterministic.fill_uninitialized_memory) == before
    with deterministic(enabled=False):  # off: nothing changes
        assert not torch.are_deterministic_algorithms_enabled() and flash_attention._autotune


def test_a_users_cublas_setting_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other deterministic value torch accepts
    with deterministic():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize(("dtype", "head_dim", "group"), [(torch.bfloat16, 64, "small_d"),
                                                          (torch.float16, 128, "large_d"),
                                                          (torch.float32, 64, "fp32")])
def test_without_autotuning_each_kernel_runs_the_first_config_of_its_list(monkeypatch, dtype, head_dim, group):
    monkeypatch.setattr(flash_attention, "_forced_configs", {})  # the interpreter forces its own configs
    q = torch.empty(1, 1, 8, head_dim, dtype=dtype)
    meta = flash_attention._meta(head_dim, causal=True, seq=8)
    assert all(flash_attention._fixed_config(name, (q,), meta) is None for name in ("fwd", "dq", "dkdv"))
    previous = flash_attention.set_autotune(False)
    try:
        for name in ("fwd", "dq", "dkdv"):
            assert flash_attention._fixed_config(name, (q,), meta) == flash_attention._CONFIGS[name][group][0]
    finally:
        flash_attention.set_autotune(previous)
    assert previous is True


def test_a_config_too_big_for_the_gpu_gives_way_to_the_next_of_its_list_for_good(monkeypatch):
    """With autotuning off, an out-of-resources config (a list sized for Hopper on a GPU with less shared memory)
    is replaced by the next one of its list, remembered, so every later launch on that GPU runs the same."""
    monkeypatch.setattr(flash_attention, "_forced_configs", {})
    monkeypatch.setattr(flash_attention, "_first_fitting", {})
    q = torch.empty(1, 1, 8, 128, dtype=torch.bfloat16)
    meta = flash_attention._meta(128, causal=True, seq=8)
    configs = flash_attention._CONFIGS["fwd"]["large_d"]
    previous = flash_attention.set_autotune(False)
    try:
        for index in range(1, len(configs)):
            assert flash_attention._next_fitting("fwd", (q,), meta) == configs[index]
            assert flash_attention._fixed_config("fwd", (q,), meta) == configs[index]
        assert flash_attention._next_fitting("fwd", (q,), meta) is None  # none left: the error goes to the caller
        assert flash_attention._fixed_config("dq", (q,), meta) == flash_attention._CONFIGS["dq"]["large_d"][0]
    finally:
        flash_attention.set_autotune(previous)
    assert flash_attention._next_fitting("fwd", (q,), meta) is None  # autotuning skips such configs itself


def test_train_runs_inside_the_mode_and_leaves_it_on_return_and_on_error(monkeypatch):
    """The trainer's wiring: train() enters the mode before anything of the run (so before any cuBLAS call) and
    leaves it however the run ends, so a notebook or test process that trains twice is not left in the mode."""
    from dist_lm.config import load_config
    from dist_lm.train import trainer

    seen = []

    def run(cfg):
        seen.append((torch.are_deterministic_algorithms_enabled(), flash_attention._autotune))
        if len(seen) == 2:
            raise RuntimeError("the run failed")
        return "result"

    monkeypatch.setattr(trainer, "_train", run)
    on = load_config(None, ["train.deterministic=true"])
    assert trainer.train(on) == "result"
    with pytest.raises(RuntimeError, match="the run failed"):
        trainer.train(on)
    trainer.train(load_config(None, []))
    assert seen == [(True, False), (True, False), (False, True)]
    assert not torch.are_deterministic_algorithms_enabled() and flash_attention._autotune

"""apply_parallelism's compile modes on the CPU: each trains like eager (the GPU runs are in tests/gpu)."""

import copy

import pytest
import torch

from dist_lm.config import ModelConfig, RunConfig
from dist_lm.errors import UserError
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups
from dist_lm.parallel import apply_compile, apply_parallelism


def _cfg() -> RunConfig:
    cfg = RunConfig(model=ModelConfig(vocab_size=97, seq_len=16, d_model=32, num_layers=2, num_heads=4,
                                      attention_backend="sdpa"))
    cfg.train.compile = True
    return cfg


@pytest.mark.parametrize("mode,checkpointing", [("blocks", False), ("cudagraphs", False), ("cudagraphs", True)])
def test_compile_modes_train_like_eager(mode, checkpointing):
    cfg = _cfg()
    cfg.train.activation_checkpointing = checkpointing  # recomputation changes no value
    torch.manual_seed(0)
    eager = TransformerLM(cfg.model)
    raw = copy.deepcopy(eager)
    compiled = apply_parallelism(raw, cfg, compile_mode=mode)
    assert all(getattr(b.forward, "_dist_lm_checkpointed", False) == checkpointing for b in raw.blocks)
    if mode == "blocks":  # compiled in place: the blocks are compiled modules, the model object is the same
        assert compiled is raw and all(b._compiled_call_impl is not None for b in raw.blocks)
    opts = [AdamW(param_groups(m, 0.1), lr=1e-2, fused=False) for m in (eager, raw)]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = (torch.randint(0, 97, (4, 16), generator=g) for _ in range(2))
        losses = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            if model is compiled and mode == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()  # what a CUDA caller does; harmless on the CPU
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_unknown_compile_mode_is_a_user_error():
    with pytest.raises(UserError, match="compile mode 'fast' is unknown"):
        apply_compile(TransformerLM(_cfg().model), "fast")


def test_the_configured_compile_mode_applies_unless_overridden():
    cfg = _cfg()
    cfg.train.compile_mode = "blocks"
    raw = TransformerLM(cfg.model)
    assert apply_parallelism(raw, cfg) is raw  # blocks compile in place
    assert all(b._compiled_call_impl is not None for b in raw.blocks)
    other = TransformerLM(cfg.model)
    wrapped = apply_parallelism(other, cfg, compile_mode="model")  # the benchmarks' override
    assert wrapped is not other and all(b._compiled_call_impl is None for b in other.blocks)


def test_how_the_trainer_compiles_per_topology():
    """compiled_as names what apply_parallelism does, and cuda_graphs (the loop's cue to mark each step) is true
    exactly when the compiled step replays as CUDA graphs: compiled, cudagraphs mode, no FSDP, a CUDA device."""
    from dist_lm.parallel import FSDPOptions, compiled_as, cuda_graphs

    cfg, cuda, cpu = _cfg(), torch.device("cuda", 0), torch.device("cpu")
    assert cfg.train.compile_mode == "cudagraphs"  # the default
    assert compiled_as(cfg, None, cuda) == "cudagraphs" and cuda_graphs(cfg, cuda, None)
    assert compiled_as(cfg, None, cpu) == "model" and not cuda_graphs(cfg, cpu, None)
    for unit, want in (("block", "blocks"), ("group", "blocks"), ("model", "model")):
        assert compiled_as(cfg, FSDPOptions(unit=unit), cuda) == want
        assert not cuda_graphs(cfg, cuda, FSDPOptions(unit=unit))
    cfg.train.compile_mode = "blocks"
    assert compiled_as(cfg, None, cuda) == "blocks" and not cuda_graphs(cfg, cuda, None)
    cfg.train.compile = False
    assert compiled_as(cfg, None, cuda) == "eager"

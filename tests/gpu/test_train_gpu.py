"""The training-path pieces on the GPU in bf16: chunked cross-entropy, the Triton AdamW, compiled steps.

Tolerances (bf16 autocast, fp32 master weights):
- chunked CE vs the float64 loss of the same bf16-rounded logits' inputs: loss within 2e-3 relative (the
  logits themselves are bf16, ~3 significant digits, but the CE averages thousands of rows); gradients
  within 2e-2 relative L2 (bf16 dlogits, as autograd's bf16 matmul backward has).
- fused AdamW vs the foreach reference: fp32 on both sides, 1e-6 absolute over 50 steps (an ulp or two:
  only fma contraction differs); vs torch.optim.AdamW(fused=True) 1e-5.
- compiled vs eager training steps: the loss within 2e-2 absolute over 3 steps (losses ~ln(V) ~ 7; inductor
  fuses and rounds bf16 intermediates differently from eager).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_lm.config import ModelConfig, RunConfig
from dist_lm.kernels.cross_entropy import linear_cross_entropy
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups
from dist_lm.optim.adamw import adamw_step
from dist_lm.parallel import apply_parallelism


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n,d,vocab,chunk", [(4133, 512, 10000, None), (3000, 768, 32000, 1024), (517, 256, 777, 100)])
def test_chunked_ce_bf16_matches_float64(n, d, vocab, chunk):
    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, d, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda", generator=g) * d**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    h64 = hidden.detach().bfloat16().double().requires_grad_()
    w64 = weight.detach().bfloat16().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-3
    assert _rel(hidden.grad, h64.grad) < 2e-2
    assert _rel(weight.grad, w64.grad) < 2e-2
    assert hidden.grad[::7].abs().max().item() == 0


def test_chunked_ce_uses_less_memory_than_full_logits():
    n, d, vocab = 16384, 768, 32000  # the 124M shape's batch: full fp32 logits alone are 2 GiB
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * 0.03).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    peaks = []
    for fused in (True, False):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (linear_cross_entropy(hidden, weight, targets) if fused
                    else F.cross_entropy((hidden @ weight.t()).float(), targets))
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[0] < 0.5 * peaks[1], peaks


def test_fused_adamw_matches_reference_and_torch_over_50_steps():
    import dist_lm.kernels.fused_adamw as fa

    shapes = [(512, 1344), (1344, 512), (10000, 512), (512,), (4097,), (3, 5)]
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    sets = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(3)]

    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]

    opts = [AdamW(groups(sets[0]), lr=1e-3, betas=(0.9, 0.95), fused=True),
            AdamW(groups(sets[1]), lr=1e-3, betas=(0.9, 0.95), fused=False),
            torch.optim.AdamW(groups(sets[2]), lr=1e-3, betas=(0.9, 0.95), fused=True)]
    launches = []
    original = fa.FusedAdamWPlan.step
    fa.FusedAdamWPlan.step = lambda self, *a, **k: (launches.append(1), original(self, *a, **k))[1]
    try:
        for step in range(50):
            grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
            for ps, opt in zip(sets, opts, strict=True):
                for group in opt.param_groups:
                    group["lr"] = 1e-3 * (1 + step % 5) / 5
                for p, grad in zip(ps, grads, strict=True):
                    p.grad = grad.clone()  # fresh allocations: the grad pointer table must follow them
                opt.step()
    finally:
        fa.FusedAdamWPlan.step = original
    assert len(launches) == 100  # one per group per step: the kernel really ran
    # On CUDA the foreach path rounds `p -= lr*wd*p` and `p -= update` separately where the kernel fuses
    # them, so over 50 steps the three drift apart by a few ulp (an H100 measured 4.1e-6 max abs at |p| up
    # to ~4.5 against foreach): tolerances relative to |p|, not the CPU test's 1e-6 absolute.
    for a, b, c, start in zip(*sets, init, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=5e-6, atol=1e-6)
        assert (a - start).abs().max().item() > 1e-3
    torch.testing.assert_close(opts[0].state[sets[0][0]]["exp_avg_sq"], opts[1].state[sets[1][0]]["exp_avg_sq"],
                               atol=1e-9, rtol=1e-6)


def test_fused_adamw_step_function_matches_adamw_step():
    from dist_lm.kernels.fused_adamw import fused_adamw_step

    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(4096 * 3 + 5,), (77, 33)]
    ps = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    qs = [p.clone() for p in ps]
    ms = [[torch.zeros_like(p) for p in ps] for _ in range(4)]
    for step in range(1, 21):
        grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
        fused_adamw_step(ps, grads, ms[0], ms[1], step, **kw)
        adamw_step(qs, grads, ms[2], ms[3], step, **kw)
    for a, b in zip(ps, qs, strict=True):  # fused vs separate roundings, as above (H100: 2.4e-6 max abs)
        torch.testing.assert_close(a, b, rtol=5e-6, atol=1e-6)


def _cfg(**model) -> RunConfig:
    cfg = RunConfig(model=ModelConfig(vocab_size=1000, seq_len=128, d_model=256, num_layers=2, num_heads=4,
                                      attention_backend="auto", **model))
    return cfg


@pytest.mark.parametrize("compile_mode,checkpointing",
                         [("model", False), ("blocks", False), ("model", True), ("cudagraphs", False),
                          ("cudagraphs", True)])
def test_compiled_bf16_steps_match_eager(compile_mode, checkpointing):
    cfg = _cfg()
    torch.manual_seed(0)
    eager = TransformerLM(cfg.model).cuda()
    raw = copy.deepcopy(eager)
    cfg.train.compile = True
    cfg.train.activation_checkpointing = checkpointing
    compiled = apply_parallelism(raw, cfg, compile_mode=compile_mode)
    opts = [AdamW(param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.95), fused=True) for m in (eager, raw)]
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 1000, (8, 128), device="cuda", generator=g)
        y = torch.randint(0, 1000, (8, 128), device="cuda", generator=g)
        losses = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            if model is compiled and compile_mode == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 2e-2, losses


def test_model_fused_loss_matches_full_logits_bf16():
    torch.manual_seed(0)
    fused = TransformerLM(_cfg(fused_loss=True).model).cuda()
    plain = TransformerLM(_cfg(fused_loss=False).model).cuda()
    plain.load_state_dict(fused.state_dict())
    x = torch.randint(0, 1000, (8, 128), device="cuda")
    y = torch.randint(0, 1000, (8, 128), device="cuda")
    losses = []
    for model in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        losses.append(loss)
    # same bf16 logits (one matmul each way), fp32 CE: equal up to the reduction order
    assert abs(losses[0].item() - losses[1].item()) < 1e-4
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        assert _rel(a.grad, b.grad) < 2e-2

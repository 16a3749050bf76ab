"""Throughput accounting: tokens/s and model FLOPs utilisation (MFU); the progress bar shows the ETA.

FLOPs per token (training, forward + backward = 3x forward):
    6 * N_matmul  +  6 * num_layers * seq_len * d_model
where N_matmul counts the parameters that take part in matrix products (all but the embedding
table, which is a lookup, and the norm gains), and the second term is the attention scores and
weighted sum (QK^T and PV: 2 * 2 * T * d per token per layer forward, times 3), halved for causal
masking as FlashAttention does. Peak FLOP/s comes from a per-device table of dense bf16 rates;
on devices not in the table MFU is not reported (tokens/s only).
"""

from __future__ import annotations

import time

import torch

from dist_lm.config import ModelConfig

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' datasheets; matched against
# torch.cuda.get_device_name by the longest key it contains ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of a TransformerLM with this config (see the module docstring)."""
    d, layers = cfg.d_model, cfg.num_layers
    per_layer = 4 * d * d + 3 * d * cfg.ffn_dim()
    matmul_params = layers * per_layer + cfg.vocab_size * d  # blocks + LM head
    attention = 6 * layers * cfg.seq_len * d  # causal: half of 12 * L * T * d
    return 6 * matmul_params + attention


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device, or None when unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in PEAK_BF16_FLOPS if k in name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


class Throughput:
    """Tokens/s and MFU over the interval since the last `measure()` call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None, num_devices: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_total = peak * num_devices if peak else None
        self._last_time = time.perf_counter()
        self._last_step = 0

    def reset(self, step: int) -> None:
        self._last_time = time.perf_counter()
        self._last_step = step

    def measure(self, step: int) -> dict[str, float]:
        """tokens/s, step time (and MFU where the peak is known) since the last reset; {} if no step ran since."""
        now = time.perf_counter()
        steps = step - self._last_step
        if steps <= 0:
            return {}
        elapsed = max(now - self._last_time, 1e-9)
        self.reset(step)
        tokens_per_s = steps * self.tokens_per_step / elapsed
        out = {"tokens_per_s": tokens_per_s, "step_time_ms": 1000 * elapsed / steps}
        if self.peak_total:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
        return out

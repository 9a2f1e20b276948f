"""Adaptive loss weighting head w_φ(t) (spec §3; EDM2's "logvar" uncertainty head)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def positional_embedding(x: Tensor, num_channels: int, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal positional embedding of a scalar per sample, ``(B,) -> (B, num_channels)``.

    Computed in float32 or better whatever the autocast state (field notes: a low-precision
    time embedding destabilises sCM training).
    """
    if num_channels % 2:
        raise ValueError(f"num_channels must be even, got {num_channels}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = num_channels // 2
    freqs = torch.exp(
        -math.log(max_positions) * torch.arange(half, device=x.device, dtype=dtype) / half
    )
    args = x.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class LogVarHead(nn.Module):
    """w_φ(t): a positional feature map of ``c_noise = t`` followed by one linear layer (§4.2).

    ``forward(t)`` takes TrigFlow times ``(B,)`` and returns the log-variance ``(B,)``;
    the sCM loss is ``exp(w)/D·‖·‖² − w``. Zero-initialised, so the initial weight is 1.
    """

    def __init__(self, num_channels: int = 128) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.linear = nn.Linear(num_channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            feats = positional_embedding(t, self.num_channels).to(self.linear.weight.dtype)
            return self.linear(feats).squeeze(1)

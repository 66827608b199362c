"""The Engram module: gated N-gram memory added to the residual stream (DeepSeek reference math).

Given the looked-up rows of all hash heads ``e`` (concatenated, E = K * head_dim) and the
hidden state of each of M hyper-connection branches ``h_m``:

    k_m  = W_k,m e + b            (one key projection per branch)
    v    = W_v e + b              (one value projection, shared)
    s_m  = <RMSNorm(h_m), RMSNorm(k_m)> / sqrt(D)
    g_m  = sigmoid(sign(s_m) * sqrt(max(|s_m|, 1e-6)))
    u_m  = g_m * v
    out  = u + SiLU(CausalDepthwiseConv(RMSNorm(u)))    (kernel 4, dilation max_ngram)

The caller adds ``out`` to the residual stream before the block's attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise conv over all M*D channels, then SiLU."""

    def __init__(self, d_model: int, hc_mult: int = 1, kernel_size: int = 4, dilation: int = 1,
                 norm_eps: float = 1e-5, zero_init: bool = True):
        super().__init__()
        self.hc_mult = hc_mult
        self.kernel_size = kernel_size
        self.dilation = dilation
        channels = d_model * hc_mult
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in range(hc_mult))
        # weight (M*D, 1, kernel): channel c = m*D + d, like the reference's Conv1d(groups=M*D)
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, M, D = x.shape  # (B, T, M, D)
        assert M == self.hc_mult, f"got {M} branches, module built for {self.hc_mult}"
        normed = torch.cat([self.norms[m](x[:, :, m, :]) for m in range(M)], dim=-1)  # (B, T, M*D)
        pad = (self.kernel_size - 1) * self.dilation
        y = F.conv1d(F.pad(normed.transpose(1, 2), (pad, 0)), self.weight,
                     dilation=self.dilation, groups=M * D)  # (B, M*D, T), causal
        return F.silu(y).transpose(1, 2).reshape(B, T, M, D)


class Engram(nn.Module):
    """One Engram layer's computation (the table lookup itself is done by a MemoryTable)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, hc_mult: int = 1,
                 kernel_size: int = 4, max_ngram: int = 3, conv_zero_init: bool = True):
        super().__init__()
        self.d_model = d_model
        self.hc_mult = hc_mult
        self.n_heads = n_heads  # K: hash heads of all orders
        self.head_dim = head_dim
        engram_dim = n_heads * head_dim  # E
        self.key_projs = nn.ModuleList(nn.Linear(engram_dim, d_model) for _ in range(hc_mult))
        self.value_proj = nn.Linear(engram_dim, d_model)
        self.key_norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(hc_mult))
        self.query_norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(hc_mult))
        self.short_conv = ShortConv(d_model, hc_mult, kernel_size, dilation=max_ngram, zero_init=conv_zero_init)

    def gates(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, T, M, 1) gate per branch; ``emb`` is (B, T, E)."""
        out = []
        for m in range(self.hc_mult):
            k = self.key_norms[m](self.key_projs[m](emb))  # (B, T, D)
            q = self.query_norms[m](hidden[:, :, m, :])  # (B, T, D)
            s = (k * q).sum(dim=-1) / math.sqrt(self.d_model)  # (B, T)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            out.append(s.sigmoid().unsqueeze(-1))
        return torch.stack(out, dim=2)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, M, D); emb (B, T, K, head_dim) or (B, T, E) -> output (B, T, M, D) to add."""
        if emb.dim() == 4:
            emb = emb.flatten(start_dim=-2)  # (B, T, E)
        emb = emb.to(hidden.dtype)
        value = self.gates(hidden, emb) * self.value_proj(emb).unsqueeze(2)  # (B, T, M, D)
        return value + self.short_conv(value)

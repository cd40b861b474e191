"""The conditional label denoiser ε_θ(x, y_t, ŷ, t) of CARD / DiffMIC (spec §4).

``encode`` runs the image encoder once per image; ``denoise`` is the cheap per-step MLP, so the
features are reused by every sampling step and by all three training streams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConditionalLinear(nn.Module):
    """γ(t) ⊙ (W u + b), with γ an embedding table initialised U(0, 1) (multiplicative only)."""

    def __init__(self, in_features: int, out_features: int, num_timesteps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.embed = nn.Embedding(num_timesteps, out_features)
        nn.init.uniform_(self.embed.weight, 0.0, 1.0)

    def forward(self, u: Tensor, t: Tensor) -> Tensor:
        return self.embed(t) * self.linear(u)


class LabelDenoiser(nn.Module):
    """Three conditional linear layers with softplus, modulated once by the image embedding.

    Args:
        num_classes: C.
        feature_dim: hidden width (6144 in the original).
        num_timesteps: T, rows of the timestep embeddings.
        encoder: image encoder returning (B, encoder_dim); None when features are given directly
            (e.g. the DCG's pooled global features, ``share_encoder``).
        encoder_dim: output width of ``encoder`` (or of the given features).
        skip_init: per-timestep c(t) of the skip ε̂ += c(t)(y_t − ŷ) (None: no skip, the original).
        dropout: dropout probability on the hidden layers (active in training mode only).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        feature_dim: int = 6144,
        num_timesteps: int = 1000,
        encoder: nn.Module | None = None,
        encoder_dim: int = 512,
        skip_init: Tensor | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.encoder = encoder
        self.proj = nn.Linear(encoder_dim, feature_dim)
        self.norm0 = nn.BatchNorm1d(feature_dim)
        self.lin1 = ConditionalLinear(2 * num_classes, feature_dim, num_timesteps)
        self.norm1 = nn.BatchNorm1d(feature_dim)
        self.lin2 = ConditionalLinear(feature_dim, feature_dim, num_timesteps)
        self.norm2 = nn.BatchNorm1d(feature_dim)
        self.lin3 = ConditionalLinear(feature_dim, feature_dim, num_timesteps)
        self.norm3 = nn.BatchNorm1d(feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)
        self.skip: nn.Embedding | None = None
        if skip_init is not None:
            if skip_init.shape != (num_timesteps,):
                raise ValueError(f"skip_init must have shape ({num_timesteps},), got {tuple(skip_init.shape)}")
            self.skip = nn.Embedding(num_timesteps, 1)
            with torch.no_grad():
                self.skip.weight.copy_(skip_init.view(-1, 1))
                self.out.weight.zero_()
                self.out.bias.zero_()

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C_in, H, W) -> embedding e (B, feature_dim); or features if no encoder."""
        f = self.encoder(x) if self.encoder is not None else x  # (B, encoder_dim)
        return self.norm0(self.proj(f))

    def denoise(self, feats: Tensor, y_t: Tensor, prior: Tensor, t: Tensor) -> Tensor:
        """Predict ε from cached features (B, F), y_t (B, C), prior (B, C) and t (B,)."""
        u = torch.cat([y_t, prior], dim=1)  # (B, 2C)
        h = F.softplus(self.norm1(self.lin1(u, t)))
        h = self.dropout(feats * h)
        h = self.dropout(F.softplus(self.norm2(self.lin2(h, t))))
        h = self.dropout(F.softplus(self.norm3(self.lin3(h, t))))
        eps_hat = self.out(h)  # (B, C)
        if self.skip is not None:
            eps_hat = eps_hat + self.skip(t) * (y_t - prior)
        return eps_hat

    def forward(self, x: Tensor, y_t: Tensor, prior: Tensor, t: Tensor) -> Tensor:
        return self.denoise(self.encode(x), y_t, prior, t)


def mmse_skip_init(alphas_cumprod: Tensor, num_classes: int) -> Tensor:
    """c(t) = √(1−ᾱ_t)/(ᾱ_t·v + 1 − ᾱ_t) with v = 1/C: E[ε | r_t] if r_0 ~ N(0, v·I)."""
    v = 1.0 / num_classes
    return (1 - alphas_cumprod).sqrt() / (alphas_cumprod * v + 1 - alphas_cumprod)


def fuse_linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """``bn(linear(x))`` in eval mode as one ``nn.Linear`` (a new module; the inputs are untouched)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
    fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(linear.weight * scale[:, None])
        bias = linear.bias if linear.bias is not None else torch.zeros_like(shift)
        fused.bias.copy_(bias * scale + shift)
    return fused.requires_grad_(False)

"""Small pieces both block families share: stochastic depth and the norm factory."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

NormKind = Literal["layer", "rms"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p`.

    Survivors are scaled by 1/(1-p) so the expected value is unchanged (as timm's
    DropPath, which SSAMBA, AuM and SSAST use). Identity at eval time or when p == 0.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, ...) -> same shape."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """LayerNorm (weight + bias) or RMSNorm (weight only; same maths as mamba-ssm's)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm: expected 'layer' or 'rms', got {kind!r}")


def linspace_rates(rate: float, n: int) -> list[float]:
    """Per-layer stochastic-depth rates rising linearly from 0 to `rate` (timm's rule).

    Plain Python, so models can be built on the meta device.
    """
    return [rate * i / (n - 1) for i in range(n)] if n > 1 else [0.0] * n

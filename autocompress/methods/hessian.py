"""Shared pieces of the second-order (OBS-family) methods, SparseGPT and GPTQ.

Both see the layer-wise reconstruction problem min ‖(W − Ŵ)Xᵀ‖² through its Hessian H = 2XXᵀ/n, and
both walk the input columns left to right, removing (pruning or rounding) one column at a time and
spreading its error over the columns not yet processed. What they need for that is the upper Cholesky
factor U of H⁻¹ (H⁻¹ = UᵀU): row c of U, divided by U[c, c], holds the optimal update of the later
columns when column c is fixed, and U[c, c]² is [H⁻¹]_cc restricted to the columns from c on.
"""

from __future__ import annotations

import torch

from autocompress.methods.registry import LayerStatistics

DEFAULT_DAMPING = 0.01  # fraction of the mean diagonal of H added to its diagonal
DEFAULT_BLOCK_SIZE = 128  # columns per lazy batch update
MAX_DAMPING_RETRIES = 6  # each retry multiplies the dampening by 10


def layer_hessian(
    stats: LayerStatistics, in_features: int, device: torch.device, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """H = 2XXᵀ/n in float32 on `device`, and the mask of dead inputs (zero diagonal: never active).

    A dead input's diagonal is set to 1 so H stays invertible; with its row and column zero, no error
    flows into or out of it, so whatever a method does to its weights costs nothing on the calibration data.
    """
    if stats.hessian is None or stats.n_tokens <= 0:
        raise ValueError(f"{method} needs the calibration Hessian of this layer")
    if tuple(stats.hessian.shape) != (in_features, in_features):
        raise ValueError(
            f"{method}: the calibration Hessian is {tuple(stats.hessian.shape)}, "
            f"the layer has {in_features} input features"
        )
    hessian = stats.hessian.to(device=device, dtype=torch.float32) * (2.0 / stats.n_tokens)
    dead = hessian.diagonal() == 0
    hessian.diagonal().masked_fill_(dead, 1.0)
    return hessian, dead


def inverse_cholesky(hessian: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The upper Cholesky factor U of (H + λI)⁻¹, with λ = `damping` × mean diagonal of H.

    If H + λI is not numerically positive definite in float32 (a low-rank H from few tokens), λ is
    raised tenfold until it is.
    """
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    diagonal = hessian.diagonal()
    mean = diagonal.mean().item()
    damp = damping * mean
    for _ in range(MAX_DAMPING_RETRIES + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        damp = damp * 10 if damp > 0 else 1e-6 * max(mean, 1e-12)
    raise ValueError("the calibration Hessian is not positive definite even with strong dampening")

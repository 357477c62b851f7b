"""Closed-form edits of linear maps (UCE, TIME): new weights in one solve, no training.

For a projection W (out x in) of text embeddings, find W' minimising
    lam ||W' - W||^2 + s_e sum_i ||W' c_i - v_i||^2 + s_p sum_j ||W' c_j - W c_j||^2
over erase inputs c_i (sent to targets v_i) and preserved inputs c_j (kept where W sent them):
    W' = (lam W + s_e sum v_i c_i^T + s_p sum (W c_j) c_j^T) (lam I + s_e sum c_i c_i^T + s_p sum c_j c_j^T)^-1.
"""

from __future__ import annotations

import torch


def ridge_edit(
    weight: torch.Tensor,
    erase: torch.Tensor,
    targets: torch.Tensor,
    preserve: torch.Tensor | None = None,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """W' for weight (out, in), erase inputs (n, in), their targets (n, out), preserved inputs (m, in); float64 solve."""
    if erase.ndim != 2 or erase.shape[1] != weight.shape[1]:
        raise ValueError(f"erase inputs must be (n, {weight.shape[1]}); got {tuple(erase.shape)}")
    if targets.shape != (erase.shape[0], weight.shape[0]):
        raise ValueError(f"targets must be ({erase.shape[0]}, {weight.shape[0]}), one per erase input; got {tuple(targets.shape)}")
    if lam <= 0:
        raise ValueError(f"lam must be positive (it keeps the solve well posed); got {lam}")
    w, c, v = weight.double(), erase.double(), targets.double()
    left = lam * w + erase_scale * v.T @ c
    right = lam * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * c.T @ c
    if preserve is not None and len(preserve):
        p = preserve.double()
        left = left + preserve_scale * (w @ p.T) @ p
        right = right + preserve_scale * p.T @ p
    return torch.linalg.solve(right, left.T).T.to(weight.dtype)

"""Least-squares reconstruction of a pruned module's output projection, from input statistics.

Keeping units K, the refit solves min ‖X_K W_Kᵀ (+ b) − X W₀ᵀ‖² ⇒ W_Kᵀ = (H_KK + λI)⁻¹ (H W₀ᵀ)_K,
λ = damp·mean(diag H), with the bias column folded into the augmented H = [[XᵀX, Σx], [Σxᵀ, n]] when
``bias`` is on (FLAP-style compensation). Errors are exact quadratic forms in the same statistics.
"""

from __future__ import annotations

import torch

from tyr.pruning.problem import ModuleProblem


def relative_error(problem: ModuleProblem, keep: list[int], weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """‖X_K Wᵀ + b − X W₀ᵀ‖² / ‖X W₀ᵀ‖², exactly, from the input statistics."""
    W0 = problem.out_weight.double()
    D = -W0.clone()
    cols = problem.columns(keep)
    D[:, cols] += weight.double()
    Ha = problem.augmented()
    if bias is None:
        num = float(((D @ Ha[:-1, :-1]) * D).sum())
    else:
        Da = torch.cat([D, bias.double()[:, None]], 1)
        num = float(((Da @ Ha) * Da).sum())
    return max(num, 0.0) / max(problem.dense_energy(), 1e-30)


def refit(
    problem: ModuleProblem, keep: list[int], bias: bool = False, damp: float = 0.001
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of the kept columns (and a bias if ``bias``) against the dense output."""
    W0 = problem.out_weight.double()
    cols = problem.columns(keep)
    if len(cols) == 0:
        if not bias:
            return torch.zeros(W0.shape[0], 0, device=W0.device), None
        return torch.zeros(W0.shape[0], 0, device=W0.device), (W0 @ problem.stats.mean.double()).float()
    Ha = problem.augmented()
    d = W0.shape[1]
    idx = torch.cat([cols, torch.tensor([d])]) if bias else cols
    A = Ha[idx][:, idx].clone()
    lam = damp * torch.diagonal(Ha[:d, :d]).mean().clamp_min(1e-12)
    A.diagonal()[: len(cols)] += lam
    B = Ha[idx][:, :d] @ W0.T  # (ZᵀX) W₀ᵀ
    try:
        L = torch.linalg.cholesky(A)
        sol = torch.cholesky_solve(B, L)
    except RuntimeError:  # not positive definite (degenerate statistics): fall back to lstsq
        sol = torch.linalg.lstsq(A, B).solution
    W = sol[: len(cols)].T.float().contiguous()
    b = sol[len(cols)].float() if bias else None
    return W, b


def compensating_bias(problem: ModuleProblem, keep: list[int]) -> torch.Tensor:
    """FLAP's baseline bias: the removed columns' contribution at the mean input, W₀[:, R] · E[x_R]."""
    W0 = problem.out_weight.double()
    mask = torch.ones(W0.shape[1], dtype=torch.bool, device=W0.device)
    mask[problem.columns(keep)] = False
    return (W0[:, mask] @ problem.stats.mean.double()[mask]).float()

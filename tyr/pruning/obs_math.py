"""Optimal brain surgeon for groups of input columns of a linear map (Týr's local pruner).

With H = XᵀX (damped) and W the output projection [out, in], removing the columns C and optimally
refitting all the others by least squares raises ‖XWᵀ − XW₀ᵀ‖² by tr(W_C [(H⁻¹)_CC]⁻¹ W_Cᵀ). The
refit is W ← W − W_C [(H⁻¹)_CC]⁻¹ (H⁻¹)_C,: and the inverse of the remaining block follows from H⁻¹
by the same Schur complement, so removal can proceed round by round."""

from __future__ import annotations

import torch

from tyr.pruning.problem import ModuleProblem


def damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp·mean(diag H)·I)⁻¹ in float64."""
    H = H.double().clone()
    H.diagonal().add_(damp * torch.diagonal(H).mean().clamp_min(1e-12))
    return torch.linalg.inv(H)


def obs_costs(p: ModuleProblem, W: torch.Tensor, Hinv: torch.Tensor, alive: list[int]) -> list[float]:
    """Group cost of removing each unit of ``alive`` (columns C) from the output projection ``W``
    with optimal compensation by the others: tr(W_C [(H⁻¹)_CC]⁻¹ W_Cᵀ)."""
    if p.unit_width == 1:  # ‖W[:, j]‖² / (H⁻¹)_jj, vectorised
        idx = torch.as_tensor(alive)
        return (W[:, idx].pow(2).sum(0) / torch.diagonal(Hinv)[idx]).tolist()
    costs = []
    for u in alive:
        C = p.columns([u])
        Wc = W[:, C]
        costs.append(float(torch.einsum("oi,ij,oj->", Wc, torch.linalg.inv(Hinv[C][:, C]), Wc)))
    return costs


def obs_remove(W: torch.Tensor, Hinv: torch.Tensor, C: torch.Tensor) -> None:
    """Remove columns ``C`` in place: refit the other columns of ``W`` and update ``H⁻¹`` to the
    inverse of the remaining block (the removed rows / columns are zeroed, their diagonal set to 1
    so the matrix stays invertible; they are never read again)."""
    inv_cc = torch.linalg.inv(Hinv[C][:, C])
    W -= W[:, C] @ inv_cc @ Hinv[C, :]
    Hinv -= Hinv[:, C] @ inv_cc @ Hinv[C, :]
    W[:, C] = 0
    Hinv[C, :] = 0
    Hinv[:, C] = 0
    Hinv[C, C] = 1.0

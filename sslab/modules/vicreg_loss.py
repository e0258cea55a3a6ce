"""VICReg loss (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022), in the form of the official code that the 25/25/1 defaults were tuned with:

    invariance s(Z, Z') = mean_{i,j} (z_ij - z'_ij)^2                         (MSE over batch and dims)
    variance   v(Z)     = mean_j relu(gamma - sqrt(Var(z_.j) + eps)),   eps = 1e-4, gamma = 1
    covariance c(Z)     = sum_{i != j} C(Z)_ij^2 / D,   C(Z) = (Z - mean)^T (Z - mean) / (N - 1)
    loss = lambda * s + mu * (v(Z) + v(Z')) / 2 + nu * (c(Z) + c(Z'))        (lambda, mu, nu = 25, 25, 1)

When training is distributed, the variance and covariance terms use the embeddings of all ranks (gathered with
gradients), as the official code does; the invariance term is local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.modules.distributed import gather_with_grad


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The n*(n-1) off-diagonal entries of a square matrix, as a flat tensor."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg_terms(
    z1: torch.Tensor, z2: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4
) -> dict[str, torch.Tensor]:
    """The three unweighted terms for embeddings (B, D) of two views; computed in fp32."""
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    g1, g2 = gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1)  # one collective for both views
    variance = (variance_term(g1, gamma, eps) + variance_term(g2, gamma, eps)) / 2
    covariance = covariance_term(g1) + covariance_term(g2)
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted VICReg loss and its unweighted terms (for logging)."""
    if z1.shape[0] < 2:
        raise ValueError("VICReg's variance and covariance need a batch of at least 2")
    t = vicreg_terms(z1, z2, gamma, eps)
    loss = sim_coeff * t["invariance"] + std_coeff * t["variance"] + cov_coeff * t["covariance"]
    return loss, t

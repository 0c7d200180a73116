"""LBYL's closed-form compensation (Lee, Kim & Choi, "Training-Free Restoration of Pruned Neural Networks",
arXiv 2502.08474; code ICML2022-LBYL/LBYL2022), on the filters of one prunable group.

Pruning output channel i of a layer loses its activation a_i. LBYL approximates it by the kept channels,
a_i ~ sum_j s_ij a_j, and restores it by adding the pruned channel's consumer weights into the kept ones:

    W'[:, j] += s_ij * W'[:, i]   for every consumer W', then column i is dropped.

**With BatchNorm** (gamma, beta, mu, sigma) and ReLU after the layer, with X = [w_j for j in J] the kept
filters (one column each) and w_i the pruned one:

    c_j  = mu_j - sigma_j * beta_j / gamma_j           the input offset that BN maps to zero
    g_i  = (gamma_i / sigma_i)^2
    K_ij = (gamma_i * sigma_j) / (gamma_j * sigma_i)    how BN rescales channel j's output into channel i's
    (X^T X + l1 g_i c c^T + l2 diag(K_i^2)) t = X^T w_i + l1 g_i c_i c
    s_ij = K_ij * t_j

t minimises ||w_i - X t||^2 (the filters agree) + l1 g_i (c_i - c.t)^2 (the BN offsets agree, so the
pre-activations agree) + l2 sum_j (K_ij t_j)^2 (small coefficients: ReLU(sum) ~ sum ReLU holds better).
sigma is sqrt(running_var + eps), the BN's own divisor. The system is solved directly (it is symmetric
positive definite for l2 > 0).

**Without BatchNorm** (LeNet-300-100, Graph WaveNet's skip and end channels) the filters are the rows
[w_k | b_k] and t solves the ridge problem with intercept, as upstream's scikit-learn Ridge fit does:
    min_t,t0 ||r_i - R_J t - t0||^2 + l2 ||t||^2,   s_ij = t_j.

**`variant="reference"`** reproduces upstream's code, which departs from the derivation in four places:
it adds (c^T c) I instead of c c^T; it takes running_var itself as sigma; it applies t instead of K * t;
and it solves with least squares. Without BatchNorm it differs only by least squares.

`prune-only` (method) is s = 0: the pruned channels are dropped with nothing restored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VARIANTS = ("derivation", "reference")


@dataclass(frozen=True)
class BatchNormStats:
    """Per-channel gamma, beta, running mean and sigma of a BatchNorm (float64)."""

    gamma: np.ndarray
    beta: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, bn, variant: str = "derivation") -> "BatchNormStats":
        """From an nn.BatchNorm*d module; sigma as the variant defines it (see the module docstring)."""
        var = bn.running_var.detach().double().cpu().numpy()
        sigma = var if variant == "reference" else np.sqrt(var + bn.eps)
        gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else np.ones_like(var)
        beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else np.zeros_like(var)
        return cls(gamma, beta, bn.running_mean.detach().double().cpu().numpy(), sigma)


def _solve(a: np.ndarray, b: np.ndarray, lstsq: bool) -> np.ndarray:
    if not lstsq:
        try:
            return np.linalg.solve(a, b)
        except np.linalg.LinAlgError:  # singular (l2 = 0 with dependent kept filters): the minimum-norm solution
            pass
    return np.linalg.lstsq(a, b, rcond=None)[0]


def scales_bn(filters: np.ndarray, kept: np.ndarray, pruned: np.ndarray, bn: BatchNormStats,
              lambda1: float, lambda2: float, variant: str = "derivation") -> np.ndarray:
    """s (len(pruned), len(kept)) for a layer followed by BatchNorm and ReLU.

    filters: (n, d) one flattened filter per output channel (no bias: BN absorbs it)."""
    w = np.asarray(filters, dtype=np.float64)
    x = w[kept].T  # (d, m)
    gamma, beta, mu, sigma = bn.gamma, bn.beta, bn.mu, bn.sigma
    c = mu - sigma * beta / gamma  # (n,)
    cj = c[kept]
    xtx = x.T @ x
    out = np.zeros((len(pruned), len(kept)))
    for row, i in enumerate(pruned):
        g = (gamma[i] / sigma[i]) ** 2
        k = (gamma[i] * sigma[kept]) / (gamma[kept] * sigma[i])  # K_i. over the kept channels
        rhs = x.T @ w[i] + lambda1 * g * c[i] * cj
        if variant == "reference":
            a = xtx + np.diag(lambda1 * g * float(cj @ cj) + lambda2 * k**2)
            out[row] = _solve(a, rhs, lstsq=True)
        else:
            a = xtx + lambda1 * g * np.outer(cj, cj) + lambda2 * np.diag(k**2)
            out[row] = k * _solve(a, rhs, lstsq=False)
    return out


def scales_plain(rows: np.ndarray, kept: np.ndarray, pruned: np.ndarray, lambda2: float,
                 variant: str = "derivation") -> np.ndarray:
    """s (len(pruned), len(kept)) for a layer followed by ReLU only: ridge with intercept on rows [w | b]."""
    r = np.asarray(rows, dtype=np.float64)
    x = r[kept].T  # (d + 1, m): one sample per filter coordinate, one feature per kept channel
    xc = x - x.mean(axis=0, keepdims=True)
    a = xc.T @ xc + lambda2 * np.eye(len(kept))
    out = np.zeros((len(pruned), len(kept)))
    for row, i in enumerate(pruned):
        y = r[i] - r[i].mean()
        out[row] = _solve(a, xc.T @ y, lstsq=variant == "reference")
    return out

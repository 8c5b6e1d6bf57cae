"""Independent float64 NumPy references of the paper's NC1 (eq. 4), shared by the test modules
(pytest puts this folder on ``sys.path``): nothing here imports nclab."""

from __future__ import annotations

import numpy as np


def ref_parts(H, y, K, weighted=False):
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    n = np.array([np.sum(y == k) for k in range(K)], dtype=np.float64)
    mus = np.stack([H[y == k].mean(axis=0) for k in range(K)])
    mu_g = (n[:, None] * mus).sum(0) / n.sum() if weighted else mus.mean(axis=0)
    C = H - mus[y]
    sigma_w = C.T @ C / len(H)
    Mt = mus - mu_g
    sigma_b = Mt.T @ Mt / K
    return n, mus, Mt, sigma_w, sigma_b, C


def ref_nc1(H, y, K, weighted=False):
    _, _, _, sw, sb, _ = ref_parts(H, y, K, weighted)
    return float(np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / K)

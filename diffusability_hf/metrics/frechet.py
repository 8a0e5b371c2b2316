"""Frechet distance between Gaussians fitted to features (FID, FDD, FVD), in float64.

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))`` (Heusel et al., 2017). The trace of the matrix
square root is taken as ``sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric PSD matrix
``S_1^(1/2) S_2 S_1^(1/2)``, which is similar to ``S_1 S_2``: two symmetric eigendecompositions instead of
``scipy.linalg.sqrtm`` of a non-symmetric product. It needs no ``eps * I`` fix for singular covariances (fewer
samples than feature dimensions). Round-off leaves eigenvalues of order ``1e-15 * lambda_max ** 2`` in the null
space (negative ones are clipped to 0; positive ones add about ``1e-8`` relative to the trace), which is far below
the error of ``sqrtm`` on the same input.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from ..files import as_plain_write


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S_1 S_2)^(1/2))`` for symmetric PSD ``S_1``, ``S_2``, in float64."""
    root = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64; see the module docstring).

    Args:
        mu1, mu2: ``(D,)`` means. sigma1, sigma2: ``(D, D)`` covariances.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"Statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and "
            f"{sigma2.shape} (were they computed with the same feature extractor?)."
        )
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(fd, 0.0))  # a distance; only round-off can push it below 0


class FeatureStatistics:
    """Running float64 mean and covariance of features, fed batch by batch (features are never all kept).

    ``cov`` is the unbiased sample covariance (``numpy.cov``'s, as pytorch-fid and torch-fidelity).
    """

    def __init__(self, dim: Optional[int] = None):
        self.n = 0
        self.total = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features) -> "FeatureStatistics":
        """Add ``(B, D)`` features (tensor or array)."""
        f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        f = f.reshape(f.shape[0], -1)
        if not np.isfinite(f).all():
            raise ValueError("The feature extractor returned NaN or inf: check its inputs and weights.")
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        if f.shape[1] != self.total.shape[0]:
            raise ValueError(f"Feature size changed from {self.total.shape[0]} to {f.shape[1]}.")
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    @classmethod
    def merge(cls, parts) -> "FeatureStatistics":
        """The statistics of the union of the sets behind ``parts`` (e.g. one per process)."""
        total = cls()
        for part in parts:
            if part.n:
                total.n += part.n
                total.total = part.total.copy() if total.total is None else total.total + part.total
                total.outer = part.outer.copy() if total.outer is None else total.outer + part.outer
        return total

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("A covariance needs at least 2 samples.")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str, meta: Optional[dict] = None) -> None:
        """``.npz`` with ``mu``, ``sigma``, ``n`` and a JSON ``meta`` string, written atomically through a temporary
        file of its own, so concurrent writers of the same cache entry never read or replace each other's half."""
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, mu=self.mu, sigma=self.sigma, n=self.n, meta=json.dumps(meta or {}))
            as_plain_write(tmp)  # not mkstemp's 0600
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def load_statistics(path: str) -> dict:
    """``{"mu", "sigma", "n", "meta"}`` from a ``.npz`` written by :meth:`FeatureStatistics.save` (or any ``.npz``
    with ``mu`` and ``sigma``, e.g. pytorch-fid's)."""
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays: it is not a statistics file.")
        return {
            "mu": data["mu"].astype(np.float64),
            "sigma": data["sigma"].astype(np.float64),
            "n": int(data["n"]) if "n" in data else None,
            "meta": json.loads(str(data["meta"])) if "meta" in data else {},
        }

"""What the diffusability bench (``train_scripts/diffusability_bench.py``) measures with, besides the toolkit's
scripts: two small feature spaces for Frechet distances that need no downloaded weights, and the seed-paired
statistics of its generation tables."""

import math
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn as nn


class DomainClassifier(nn.Module):
    """A small CNN: 4 conv stages (stride 2, GroupNorm, SiLU), global average pooling, ``dim``-d features, a linear
    head over ``num_classes``. Trained on the bench's training crops to tell their classes apart, its features are
    a domain "Inception" (Inception itself is a download and was not trained on such data)."""

    def __init__(self, num_classes: int, width: int = 32, dim: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, dim]
        layers = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, num_classes) logits
        return self.head(self.features(x))


class DomainFeatures(nn.Module):
    """The classifier's features as a ``--feature_extractor`` (TorchScript) sees them: float ``[0, 1]`` images
    ``(B, 3, H, W)`` -> ``(B, dim)``."""

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.features = classifier.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * 2 - 1)


class RandomFeatures(nn.Module):
    """An untrained CNN with fixed seeded weights: no data and no labels, so independent of any classifier trained
    on the bench's data. 5 conv stages (3x3, stride 2, ReLU; PyTorch's default init under ``torch.manual_seed
    (seed)``); the spatial mean of every stage's activations, concatenated (8 + 16 + 24 + 32 + 48 = 128-d: colour
    and texture statistics at 2 to 32 pixels). Random-weight embeddings are a known data-free feature space for
    Frechet distances (Naeem et al., 2020, "Reliable Fidelity and Diversity Metrics for Generative Models").
    Float ``[0, 1]`` images ``(B, 3, H, W)`` -> ``(B, 128)``."""

    def __init__(self, seed: int = 0, widths: Sequence[int] = (8, 16, 24, 32, 48)):
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        chans = [3, *widths]
        self.stages = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(chans, chans[1:])
        )
        torch.random.set_rng_state(state)  # the caller's random stream is left as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        pooled = []
        for conv in self.stages:
            x = torch.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def paired_comparison(per_seed: Dict[str, Dict[int, float]], baseline: str) -> Dict[str, dict]:
    """Mean and std (ddof 1) over seeds of each entry of ``per_seed`` (``{name: {seed: value}}``, the same seeds
    for all), and for every name but ``baseline`` the seed-paired difference ``value - baseline`` with its standard
    error and 95% Student-t interval (n - 1 degrees of freedom: with 3 seeds the interval is +-4.30 standard
    errors, not +-1.96). Differing seed sets raise a ``ValueError``: unpaired numbers are never compared."""
    from scipy import stats

    seeds = sorted(per_seed[baseline])
    base = np.array([per_seed[baseline][s] for s in seeds], dtype=np.float64)
    n = len(seeds)
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")
    summary = {}
    for name, values in per_seed.items():
        if sorted(values) != seeds:
            raise ValueError(f"{name} has seeds {sorted(values)}, {baseline} has {seeds}: they must be paired.")
        v = np.array([values[s] for s in seeds], dtype=np.float64)
        row = {"per_seed": {str(s): float(values[s]) for s in seeds}, "mean": float(v.mean()),
               "std": float(v.std(ddof=1)) if n > 1 else float("nan")}  # fmt: skip
        if name != baseline:
            d = v - base
            d_std = float(d.std(ddof=1)) if n > 1 else float("nan")
            se = d_std / math.sqrt(n) if n > 1 else float("nan")
            low, high = float(d.mean()) - t * se, float(d.mean()) + t * se
            row.update(baseline=baseline, diff=float(d.mean()), diff_std=d_std, diff_standard_error=se,
                       diff_ci95=[low, high], ci95_excludes_zero=bool(np.isfinite(se) and (low > 0 or high < 0)))  # fmt: skip
        summary[name] = row
    return summary

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


# ----------------------------------------------------------------------------------------------------------------
# Is the generator an instrument? Diagnostics that expose a generator that cannot rank latent spaces: one that
# ignores its class, one that ignores where things are, one still improving. Images are (N, 3, H, W) in [-1, 1].


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Share of ``images`` that ``classifier`` (``(B, 3, H, W)`` in ``[-1, 1]`` -> logits) assigns to ``labels``, the
    classes the generator was asked for. A class-blind generator scores chance, ``1 / num_classes``."""
    predictions = torch.cat(
        [classifier(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )
    return float((predictions == labels.to(predictions.device)).float().mean())


def well_above_chance(correct: int, total: int, num_classes: int, p_max: float = 1e-3) -> Dict[str, float]:
    """Whether ``correct`` of ``total`` class predictions are well above chance ``1 / num_classes``: an accuracy of at
    least twice chance and a one-sided binomial test against chance with ``p < p_max`` (both: a large sample makes a
    tiny excess significant, a small one makes a large excess a fluke)."""
    from scipy import stats

    chance = 1.0 / num_classes
    p = float(stats.binomtest(int(correct), int(total), chance, alternative="greater").pvalue)
    accuracy = correct / total
    return {
        "accuracy": accuracy,
        "chance": chance,
        "p_value": p,
        "well_above": bool(accuracy >= 2 * chance and p < p_max),
    }


def class_position_means(images: torch.Tensor, labels: torch.Tensor, num_classes: int, grid: int = 8) -> torch.Tensor:
    """Per-class mean image at ``grid x grid`` (area average), with each class's spatial mean per channel removed:
    ``(K, 3, grid, grid)``, what is where in each class (layout), not its colour. A class with no image is NaN."""
    small = nn.functional.adaptive_avg_pool2d(images.float(), grid)  # (N, 3, grid, grid)
    out = torch.full((num_classes, images.shape[1], grid, grid), float("nan"))
    for k in range(num_classes):
        members = small[labels == k]
        if len(members):
            mean = members.mean(0)
            out[k] = mean - mean.mean(dim=(-1, -2), keepdim=True)
    return out


def layout_correlation(means: torch.Tensor, reference_means: torch.Tensor) -> float:
    """Mean over classes of the Pearson correlation between two :func:`class_position_means` (a generator's and the
    data's): about 0 when the generator's per-class layout is unrelated to the data's (e.g. positions it cannot
    see), up to the data's own consistency between two samples of it. Classes missing on either side are skipped."""
    values = []
    for a, b in zip(means.flatten(1), reference_means.flatten(1)):
        if torch.isnan(a).any() or torch.isnan(b).any():
            continue
        a, b = a - a.mean(), b - b.mean()
        denom = float(a.norm() * b.norm())
        values.append(float(a @ b) / denom if denom > 0 else 0.0)
    return float(np.mean(values)) if values else float("nan")


def thumbnail_features(images: torch.Tensor, size: int = 8) -> np.ndarray:
    """``(N, 3 * size * size)`` area-averaged thumbnails in ``[-1, 1]``: a feature space that keeps *where* colour
    is (both bench CNNs average their features over space, so their FD cannot see a layout error)."""
    return nn.functional.adaptive_avg_pool2d(images.float(), size).flatten(1).numpy().astype(np.float64)


def instrument_flags(
    class_check: Dict[str, float],
    layout: float,
    layout_ceiling: float,
    last_gain: float,
    seed_std: float,
) -> Dict[str, bool]:
    """Why a generator cannot rank latent spaces: ``class_blind`` (its samples are not :func:`well_above_chance`),
    ``layout_blind`` (its :func:`layout_correlation` is below half the data's own between two of its samples) and
    ``still_improving`` (its FD fell over the last interval of training by more than the seed-to-seed std of the
    final FD). ``usable`` is none of them. Data without a consistent layout (a ceiling <= 0) cannot show a
    layout-blind generator: that flag is then None (not measurable), as is ``still_improving`` without a curve."""
    flags = {
        "class_blind": not class_check["well_above"],
        "layout_blind": None if not layout_ceiling > 0 else bool(not layout >= 0.5 * layout_ceiling),
        "still_improving": bool(last_gain > seed_std) if math.isfinite(last_gain) else None,
    }
    flags["usable"] = not any(flags.values())
    return flags

"""Reconstruction and generation metrics: PSNR, SSIM (``quality``), Frechet distances (``frechet``), the
feature extractors behind FID, FDD and FVD (``features``), and an AE's reconstruction and latent spectrum on
validation pixels (``reconstruction``). LPIPS is :func:`diffusability_hf.losses.load_lpips`."""

from .features import (
    FeatureExtractor,
    extract_features,
    fetch_weights,
    load_feature_extractor,
    to_uint8,
)
from .frechet import FeatureStatistics, frechet_distance, load_statistics, trace_sqrt_product
from .quality import mean_and_ci, psnr, ssim

__all__ = [
    "FeatureExtractor",
    "FeatureStatistics",
    "extract_features",
    "fetch_weights",
    "frechet_distance",
    "load_feature_extractor",
    "load_statistics",
    "mean_and_ci",
    "psnr",
    "ssim",
    "to_uint8",
    "trace_sqrt_product",
]

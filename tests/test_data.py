"""Datasets: the embedded photographs, image folders with corrupt files."""

import numpy as np
import torch
from PIL import Image

from diffusability_hf.data import (
    EMBEDDED_TRAIN_IMAGES,
    EMBEDDED_VALIDATION_IMAGES,
    EmbeddedPhotoCrops,
    HFImageDataset,
    collate,
    embedded_validation_batch,
    load_embedded_image,
    load_image_dataset,
)


def test_embedded_photographs_are_rgb_and_disjoint():
    assert not set(EMBEDDED_TRAIN_IMAGES) & set(EMBEDDED_VALIDATION_IMAGES)
    for name in EMBEDDED_TRAIN_IMAGES + EMBEDDED_VALIDATION_IMAGES:
        img = load_embedded_image(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 256


def test_embedded_crops_are_deterministic_per_index():
    ds = EmbeddedPhotoCrops(32, num_samples=20, seed=3)
    a, b = ds[5]["pixel_values"], EmbeddedPhotoCrops(32, num_samples=20, seed=3)[5]["pixel_values"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, ds[6]["pixel_values"])
    assert not torch.equal(a, EmbeddedPhotoCrops(32, num_samples=20, seed=4)[5]["pixel_values"])
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.01


def test_validation_batch_is_fixed_and_held_out():
    v1, v2 = embedded_validation_batch(48, 8), embedded_validation_batch(48, 8)
    assert v1.shape == (8, 3, 48, 48) and torch.equal(v1, v2)


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "3.png").write_bytes((tmp_path / "0.png").read_bytes()[:60])  # truncated
    ds, column = load_image_dataset(None, str(tmp_path), None)
    data = HFImageDataset(ds, column, resolution=16, center_crop=False, random_flip=True)
    items = [data[i] for i in range(len(data))]
    batch = collate(items)
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["num_skipped"] == 1

"""Image datasets for autoencoder fine-tuning: HF ``datasets``, image folders, and the embedded sample photographs.

Every dataset yields ``{"pixel_values": (3, R, R) float in [-1, 1], "num_skipped": int}``. An unreadable or
corrupt image is skipped (the next one is used instead) and counted in ``num_skipped``, never a crash.
"""

from __future__ import annotations

import io
import logging
import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Colour photographs that ship inside scikit-image (`skimage.data`), all loadable offline.
EMBEDDED_TRAIN_IMAGES = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
)
EMBEDDED_VALIDATION_IMAGES = ("chelsea", "coffee")


def load_embedded_image(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 photograph from ``skimage.data`` (``motorcycle_left``/``right`` from the stereo pair)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    image = getattr(skimage.data, name)()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB photograph.")
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``(3, H, W)`` float32 in ``[-1, 1]``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random):
    """Resize the shorter side to ``resolution`` (bicubic), then a center or random square crop, then a flip."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


class EmbeddedPhotoCrops(torch.utils.data.Dataset):
    """``num_samples`` random crops of the scikit-image photographs, deterministic per index and ``seed``.

    Each crop takes a random region of side ``resolution * s`` with ``s`` uniform in ``scale_range`` and resizes it
    to ``resolution`` (bicubic), so one photograph yields crops at several scales.
    """

    def __init__(
        self,
        resolution: int,
        names: Sequence[str] = EMBEDDED_TRAIN_IMAGES,
        num_samples: int = 4096,
        seed: int = 0,
        random_flip: bool = True,
        scale_range=(1.0, 4.0),
    ):
        self.resolution, self.num_samples, self.seed = resolution, num_samples, seed
        self.random_flip, self.scale_range = random_flip, scale_range
        self.images = [Image.fromarray(load_embedded_image(n)) for n in names]
        self.names = list(names)

    def __len__(self) -> int:
        return self.num_samples

    def crop(self, index: int):
        """``(pixels (3, R, R), image index)`` of crop ``index``."""
        rng = random.Random(self.seed * 1_000_003 + index)
        k = index % len(self.images)
        image = self.images[k]
        w, h = image.size
        side = int(min(self.resolution * rng.uniform(*self.scale_range), w, h))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = image.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, Image.BICUBIC)
        if self.random_flip and rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(crop), k

    def __getitem__(self, index: int) -> Dict:
        pixels, _ = self.crop(index)
        return {"pixel_values": pixels, "num_skipped": 0}


def _open_image(item) -> Image.Image:
    """Decode an HF ``datasets`` image cell (``PIL.Image``, ``{"bytes", "path"}``, or a path) and force a full load."""
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, dict):
        image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
    else:
        image = Image.open(item)
    image.load()  # truncated/corrupt files fail here, not later in a worker's collate
    return image


class HFImageDataset(torch.utils.data.Dataset):
    """An HF ``datasets`` split (hub dataset or ``imagefolder``) with undecoded images, decoded and cropped here."""

    def __init__(
        self, dataset, image_column: str, resolution: int, center_crop: bool, random_flip: bool, seed: int = 0
    ):
        self.dataset, self.image_column = dataset, image_column
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        for attempt in range(min(len(self), 100)):
            row = self.dataset[(index + attempt) % len(self)]
            try:
                image = _open_image(row[self.image_column])
                image = resize_and_crop(image, self.resolution, self.center_crop, self.random_flip, rng)
                return {"pixel_values": to_tensor(image), "num_skipped": attempt}
            except Exception as err:  # corrupt or unreadable: skip and count
                where = row[self.image_column].get("path") if isinstance(row[self.image_column], dict) else index
                logger.warning("Skipping unreadable image %s: %s", where, err)
        raise RuntimeError("100 consecutive images could not be read: check the dataset.")


def load_image_dataset(
    dataset_name: Optional[str],
    train_data_dir: Optional[str],
    image_column: Optional[str],
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
):
    """Load an HF dataset (hub name or local ``imagefolder``) with the image column left undecoded.

    Returns ``(dataset, image_column)``. Errors name the missing column or folder.
    """
    import datasets

    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder.")
        ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    else:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    columns = ds.column_names
    if image_column is None:
        image_column = next((c for c in columns if isinstance(ds.features[c], datasets.Image)), columns[0])
    if image_column not in columns:
        raise ValueError(f"--image_column '{image_column}' is not in the dataset; its columns are {columns}.")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds, image_column


def collate(examples: List[Dict]) -> Dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "num_skipped": sum(int(e["num_skipped"]) for e in examples),
    }


def embedded_validation_batch(resolution: int, num_images: int = 8) -> torch.Tensor:
    """Fixed ``(N, 3, R, R)`` validation crops from the held-out photographs (a regular grid, no randomness)."""
    crops = []
    for name in EMBEDDED_VALIDATION_IMAGES:
        image = Image.fromarray(load_embedded_image(name))
        side = min(image.size) // 2
        w, h = image.size
        for top, left in ((0, 0), (h - side, w - side), (0, w - side), (h - side, 0)):
            crops.append(
                to_tensor(image.crop((left, top, left + side, top + side)).resize((resolution,) * 2, Image.BICUBIC))
            )
    crops = crops[:num_images]
    return torch.stack(crops)

"""Image data for the toolkit's scripts: HF ``datasets``, image folders and the embedded sample photographs. Videos,
camera pans and joint image + video batches are in :mod:`diffusability_hf.data.videos`; the fixed evaluation sets
(images or clips) in :mod:`diffusability_hf.data.evaluation`.

What an item is, per dataset (pixels are float in ``[-1, 1]``):

- :class:`EmbeddedPhotoCrops`, :class:`HFImageDataset` (autoencoder fine-tuning):
  ``{"pixel_values": (3, R, R), "skipped": [(where, reason), ...]}``. An unreadable or corrupt image is skipped
  (the next one is used instead) and named in ``skipped``, never a crash; the training loop's :class:`SkipLog`
  warns once per file and counts files and skip events. :func:`collate` stacks them.
- :class:`LabelledImages` (class-conditional DiT training): ``(pixels (3, R, R), label, index, ok)``.
- :class:`~diffusability_hf.data.evaluation.EvalSamples` (evaluation): ``(pixels, ok)``, pixels ``(3, R, R)`` or
  clips ``(3, T, R, R)``.

``ok = False`` marks an unreadable item (zeros are returned): the caller drops and counts it.
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

from ..errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # image files (also the frames of a frame folder)

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


# Colour photographs of other installed packages (each used only if its package is installed): scikit-learn's
# sample images and matplotlib's sample data. The RGBA and synthetic images of these packages are not photographs.
OPTIONAL_PHOTOGRAPHS = {
    "sklearn_china": ("sklearn", "china.jpg"),
    "sklearn_flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
}


def installed_photographs() -> List[str]:
    """Every colour photograph that ships with the installed packages, by name (for :func:`load_photograph`): the
    scikit-image ones of :data:`EMBEDDED_TRAIN_IMAGES` and :data:`EMBEDDED_VALIDATION_IMAGES`, then those of
    :data:`OPTIONAL_PHOTOGRAPHS` whose package is installed."""
    import importlib.util

    names = list(EMBEDDED_TRAIN_IMAGES) + list(EMBEDDED_VALIDATION_IMAGES)
    return names + [n for n, (package, _) in OPTIONAL_PHOTOGRAPHS.items() if importlib.util.find_spec(package)]


def load_photograph(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8: a scikit-image photograph (:func:`load_embedded_image`) or one of
    :data:`OPTIONAL_PHOTOGRAPHS` (scikit-learn's sample images, matplotlib's sample data)."""
    if name not in OPTIONAL_PHOTOGRAPHS:
        return load_embedded_image(name)
    package, filename = OPTIONAL_PHOTOGRAPHS[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(filename), dtype=np.uint8)
    import matplotlib.cbook

    return np.asarray(Image.open(matplotlib.cbook.get_sample_data(filename, asfileobj=False)).convert("RGB"))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``(3, H, W)`` float32 in ``[-1, 1]``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


_warned_upscale = []


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random):
    """Resize the shorter side to ``resolution`` (bicubic), then a center or random square crop, then a flip. An
    image smaller than ``resolution`` is upscaled, with a warning (once per process): blurry training data."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale > 1 and not _warned_upscale:
        _warned_upscale.append(True)
        logger.warning(
            "An image of %dx%d is smaller than --resolution %d and is upscaled (blurry training data; warned once): "
            "lower --resolution or leave such images out.", w, h, resolution,
        )  # fmt: skip
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
    """``num_samples`` random crops of the scikit-image photographs (or any of :func:`installed_photographs`),
    deterministic per index and ``seed``; crop ``i`` comes from photograph ``i % len(names)``.

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
        self.images = [Image.fromarray(load_photograph(n)) for n in names]
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
        return {"pixel_values": pixels, "skipped": []}


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image(item) -> Image.Image:
    """Decode an HF ``datasets`` image cell (``PIL.Image``, ``{"bytes", "path"}``, or a path) and force a full load;
    the image as it should be seen: its EXIF orientation applied (photos from phones are stored sideways), 16-bit
    grey scaled to 8 bits (PIL's RGB conversion clips it: a 16-bit PNG would train as a white image)."""
    from PIL import ImageOps

    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, dict):
        image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
    else:
        image = Image.open(item)
    image.load()  # truncated/corrupt files fail here, not later in a worker's collate
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = np.asarray(image, dtype=np.float32) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8), "L")
    return image


def open_and_crop(cell, resolution: int) -> Optional[torch.Tensor]:
    """An HF image cell as a ``(3, R, R)`` centre crop in ``[-1, 1]``; ``None`` (and a warning) when unreadable."""
    try:
        image = resize_and_crop(open_image(cell), resolution, True, False, random.Random(0))
    except Exception as err:  # corrupt or unreadable: the caller skips and counts it
        logger.warning("Skipping unreadable image %s: %s", cell.get("path") if isinstance(cell, dict) else cell, err)
        return None
    return to_tensor(image)


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
        skipped = []
        for attempt in range(min(len(self), 100)):
            row = self.dataset[(index + attempt) % len(self)]
            try:
                image = open_image(row[self.image_column])
                image = resize_and_crop(image, self.resolution, self.center_crop, self.random_flip, rng)
                return {"pixel_values": to_tensor(image), "skipped": skipped}
            except Exception as err:  # corrupt or unreadable: skip it, name it (the training loop warns once)
                cell = row[self.image_column]
                where = (
                    cell.get("path") if isinstance(cell, dict) else None
                ) or f"row {(index + attempt) % len(self)}"
                skipped.append((str(where), f"{type(err).__name__}: {err}"))
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
        "skipped": [s for e in examples for s in e["skipped"]],
    }


class SkipLog:
    """The unreadable files a training run met: each warned about once and counted once, plus the skip events.

    Datasets replace an unreadable item by the next one and name it in ``batch["skipped"]`` every time they meet it
    (every epoch, in every DataLoader worker); counting those events would count one corrupt file many times.
    """

    def __init__(self):
        self.files: Dict[str, str] = {}  # where -> reason
        self.events = 0

    def update(self, skipped: Sequence) -> None:
        for where, reason in skipped:
            self.events += 1
            if where not in self.files:
                self.files[where] = reason
                logger.warning(
                    "Skipping unreadable file %s (%s); it will be skipped silently from now on", where, reason
                )

    def merge(self, others: Sequence["SkipLog"]) -> "SkipLog":
        """The union of several processes' logs (e.g. from ``accelerate.utils.gather_object``)."""
        merged = SkipLog()
        for log in others:
            for where, reason in log.files.items():
                merged.files.setdefault(where, reason)
            merged.events += log.events
        return merged

    def summary(self, limit: int = 20) -> Dict:
        """``{"unreadable_files": count, "skip_events": count, "unreadable_examples": first paths}``."""
        return {
            "unreadable_files": len(self.files),
            "skip_events": self.events,
            "unreadable_examples": sorted(self.files)[:limit],
        }


def hold_out(num_items: int, num_held_out: int, read, seed: int = 0):
    """A validation set held out of a training set: ``num_held_out`` readable items in a seeded random order.

    Args:
        num_items: the size of the training source.
        num_held_out: how many readable items to hold out.
        read: ``read(i)`` returns item ``i`` as a tensor, or ``None`` when it cannot be read.
        seed: picks the order.

    Returns ``(pixels, held_out, unreadable)``: the stacked items (as many as could be read, at most
    ``num_held_out``), the indices to remove from training (every index examined, readable or not) and the
    unreadable ones among them. Items are never repeated to fill the set.
    """
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + 1_234_567)).tolist()
    items, examined, unreadable = [], [], []
    for i in order:
        if len(items) == num_held_out:
            break
        examined.append(i)
        x = read(i)
        if x is None:
            unreadable.append(i)
        else:
            items.append(x)
    return (torch.stack(items) if items else None), sorted(examined), sorted(unreadable)


def held_out_split(num_items: int, num_held_out: int, read, what: str, flag: str, seed: int):
    """:func:`hold_out` for a training script: ``(pixels, training indices, info)``, the training indices being the
    others. Raises a :class:`UsageError` naming ``flag`` when too few items can be read to hold out and still train;
    ``what`` names the items ("images", "videos") in messages, ``info`` records the split for ``metrics.json``."""
    pixels, held, unreadable = hold_out(num_items, num_held_out, read, seed)
    train = [i for i in range(num_items) if i not in set(held)]
    if pixels is None or not train:
        raise UsageError(
            f"The training data has {num_items} {what} ({len(unreadable)} unreadable among those examined): too few "
            f"to hold out {num_held_out} for validation and train on the rest. Lower {flag} or add data."
        )
    info = {
        "source": f"held out of the training data at random (seed {seed}), never trained on",
        "num_held_out": int(pixels.shape[0]),
        "held_out_indices": held,
        "unreadable_held_out_indices": unreadable,
    }
    if pixels.shape[0] < num_held_out:
        logger.warning(
            f"Only {pixels.shape[0]} readable {what} could be held out for validation ({flag} {num_held_out})."
        )
    return pixels, train, info


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


def training_images(
    resolution: int,
    num_validation: int,
    seed: int,
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    center_crop: bool = False,
    random_flip: bool = False,
):
    """Autoencoder fine-tuning images: ``(train dataset, validation pixels (N, 3, R, R), info)``.

    With a dataset or folder, ``num_validation`` readable images are held out at random (seeded) and never trained
    on (:func:`held_out_split`); with neither, the training set is :class:`EmbeddedPhotoCrops` (random flips on) and
    the validation set :func:`embedded_validation_batch`, crops of other photographs.
    """
    if dataset_name is None and train_data_dir is None:
        logger.info("No image dataset given: training on crops of the photographs that ship inside scikit-image.")
        info = {
            "source": f"crops of the photographs {' and '.join(EMBEDDED_VALIDATION_IMAGES)}, never trained on",
            "num_held_out": num_validation,
        }
        train = EmbeddedPhotoCrops(resolution, seed=seed, random_flip=True)
        return train, embedded_validation_batch(resolution, num_validation), info
    ds, column = load_image_dataset(dataset_name, train_data_dir, image_column, dataset_config_name, cache_dir)
    val, train_indices, info = held_out_split(
        len(ds), num_validation, lambda i: open_and_crop(ds[i][column], resolution), "images",
        "--num_validation_images", seed,
    )  # fmt: skip
    train = HFImageDataset(ds.select(train_indices), column, resolution, center_crop, random_flip, seed)
    return train, val, info


class LabelledImages(torch.utils.data.Dataset):
    """``(pixels (3, R, R), label, index, ok)`` for class-conditional training: centre crops of an HF dataset or an
    image folder whose subfolders are the classes (HF ``imagefolder`` gives them as ``label``), or, with neither,
    crops of the embedded photographs labelled by source photograph. ``ok`` is False for an unreadable image (zeros
    are returned; the caller skips and counts it). ``random_flip`` mirrors half the images (seeded per index and
    ``epoch``). ``names`` lists the class names in label order.
    """

    def __init__(
        self,
        resolution: int,
        dataset_name: Optional[str] = None,
        train_data_dir: Optional[str] = None,
        image_column: Optional[str] = None,
        label_column: str = "label",
        dataset_config_name: Optional[str] = None,
        cache_dir: Optional[str] = None,
        split: str = "train",
        embedded_samples: Optional[int] = 1024,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.resolution, self.random_flip, self.seed, self.epoch = resolution, random_flip, seed, 0
        self.embedded = None
        if dataset_name is None and train_data_dir is None:
            self.embedded = EmbeddedPhotoCrops(resolution, num_samples=embedded_samples or 1024, random_flip=False)
            self.names = list(EMBEDDED_TRAIN_IMAGES)
            return
        ds, self.image_column = load_image_dataset(
            dataset_name, train_data_dir, image_column, dataset_config_name, cache_dir, split
        )
        if label_column not in ds.column_names:
            raise ValueError(
                f"--label_column '{label_column}' is not in the dataset; its columns are {ds.column_names}. "
                "An image folder gets 'label' from its subfolder names."
            )
        feature = ds.features[label_column]
        self.names = (
            list(feature.names) if hasattr(feature, "names") else [str(v) for v in sorted(set(ds[label_column]))]
        )
        self.ds, self.label_column = ds, label_column

    def __len__(self) -> int:
        return len(self.embedded) if self.embedded is not None else len(self.ds)

    def __getitem__(self, index: int):
        if self.embedded is not None:
            pixels, label = self.embedded.crop(index)
            ok = True
        else:
            row = self.ds[index]
            label = row[self.label_column]
            label = label if isinstance(label, int) else self.names.index(str(label))
            pixels = open_and_crop(row[self.image_column], self.resolution)
            ok = pixels is not None
            if not ok:
                pixels = torch.zeros(3, self.resolution, self.resolution)
        if self.random_flip and random.Random(hash((self.seed, self.epoch, index))).random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels, label, index, ok


def collate_labelled(items: List) -> Dict:
    """:class:`LabelledImages` items -> ``{"pixels": (B, 3, R, R), "label": (B,)}``, unreadable images dropped (the
    dataset counted them when it read them)."""
    kept = [it for it in items if it[3]]
    return {"pixels": torch.stack([it[0] for it in kept]), "label": torch.tensor([it[1] for it in kept])}

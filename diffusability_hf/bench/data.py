"""The bench's data: crops of the installed photographs as image folders, and the feature spaces of its Frechet
distances (a domain classifier trained on the training crops, a seeded random CNN)."""

import json
import os
import shutil

import numpy as np
import torch
import torch.nn as nn

from ..data.images import EmbeddedPhotoCrops
from ..files import atomic_write_json
from ..metrics.bench import (
    DomainClassifier,
    DomainFeatures,
    RandomFeatures,
)
from .settings import FEATURES

# ----------------------------------------------------------------------------------------------------------------
# Running the toolkit's scripts


# ----------------------------------------------------------------------------------------------------------------
# Data and feature spaces


def write_crops(folder, names, num, resolution, seed):
    """``num`` random-scale crops of the photographs ``names`` (crop ``i`` from photograph ``i % len(names)``) as
    PNGs in ``folder/<photograph>/``, an image folder whose subfolders are the classes."""
    from PIL import Image

    if os.path.isfile(os.path.join(folder, ".complete")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    crops = EmbeddedPhotoCrops(resolution, names, num_samples=num, seed=seed, random_flip=False)
    for i in range(num):
        pixels, k = crops.crop(i)
        sub = os.path.join(folder, names[k])
        os.makedirs(sub, exist_ok=True)
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(os.path.join(sub, f"{i:05d}.png"))
    open(os.path.join(folder, ".complete"), "w").close()


def image_folder_items(folder):
    """``[(path, class index)]`` of an image folder whose subfolders are the classes, and the class names."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    items = [
        (os.path.join(folder, c, f), k)
        for k, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(folder, c)))
        if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    ]
    return items, classes


def load_items(items, resolution):
    from diffusability_hf.data.images import open_and_crop

    pixels, labels = [], []
    for path, label in items:
        x = open_and_crop(path, resolution)
        if x is not None:
            pixels.append(x)
            labels.append(label)
    return torch.stack(pixels), torch.tensor(labels)


def make_feature_spaces(out, train_dir, test_dir, resolution, steps, batch=32):
    """Train the domain classifier on ``train_dir`` (random flips), measure its accuracy on ``test_dir`` (other
    crops), export both feature networks as TorchScript, and the classifier itself (``classifier_domain.pt``: the
    class accuracy of a generator's samples). Returns ``({name: path}, accuracy)``."""
    paths = {name: os.path.join(out, f"features_{name}.pt") for name in FEATURES}
    info_path = os.path.join(out, "features.json")
    classifier_path = os.path.join(out, "classifier_domain.pt")
    if all(os.path.isfile(p) for p in [*paths.values(), classifier_path, info_path]):
        with open(info_path) as fh:
            return paths, json.load(fh)["domain_accuracy"]
    torch.manual_seed(0)
    train_items, classes = image_folder_items(train_dir)
    x_train, y_train = load_items(train_items, resolution)
    x_test, y_test = load_items(image_folder_items(test_dir)[0], resolution)
    model = DomainClassifier(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch,), generator=gen)
        x = x_train[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = nn.functional.cross_entropy(model(x), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    torch.jit.script(DomainFeatures(model)).save(paths["domain"])
    torch.jit.script(model).save(classifier_path)
    torch.jit.script(RandomFeatures(seed=0).eval()).save(paths["random"])
    atomic_write_json(info_path, {"domain_accuracy": accuracy, "classes": classes, "steps": steps})
    return paths, accuracy


def load_samples(folder):
    """An eval_dit ``samples/`` folder as ``(images (N, 3, H, W) in [-1, 1], the classes they were asked for)``."""
    from PIL import Image

    with open(os.path.join(folder, "labels.json")) as fh:
        labels = json.load(fh)
    names = sorted(labels)
    images = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")).copy()) for n in names]
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.tensor([int(labels[n]) for n in names])

"""The latent shard format: what ``train_scripts/extract_latents.py`` writes and its readers read.

A folder holds safetensors shards ``shard-00000.safetensors``, ... (each a fixed slice of the dataset) and
``metadata.json``. A shard stores, per readable image, the posterior ``mean`` and ``std`` ``(N, C, h, w)`` (``std``
absent for a deterministic encoder), with ``--flip`` those of the mirrored image (``mean_flip``, ``std_flip``), the
``labels`` and the dataset ``indices`` ``(N,)``; its header (one key, ``extraction``) records the extraction settings,
the autoencoder by its weights fingerprint among them, and how many images were unreadable. ``metadata.json`` repeats
the settings and adds the class names, the shard list and the per-channel statistics of the posterior samples the
DiT normalises with (:func:`latent_statistics`).

Writer: :func:`write_shard`, :func:`write_metadata`, with :func:`check_existing_latents` and :func:`remove_latents`
for a folder that already holds latents. Readers: :func:`read_latents_metadata` (checked against every shard),
:class:`LatentShards` (the DiT's training rows) and :func:`read_latent_rows` (the first rows at once). Provenance:
:func:`check_latents_autoencoder` refuses latents that other autoencoder weights encoded. Without shards (images
encoded during training), :func:`on_the_fly_metadata` and :func:`estimate_latent_statistics` give what extraction
would have written.
"""

import json
import os
import random
import re
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from .. import autoencoders as ae
from ..errors import MissingPathError, UsageError, error_summary
from ..files import atomic_write_json

SHARD_RE = re.compile(r"^shard-\d{5,}\.safetensors$")
METADATA = "metadata.json"


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard-00000.safetensors``, ..."""
    return f"shard-{index:05d}.safetensors"


def _shard_rows(path: str) -> int:
    """Rows of a shard, from its header (0 for a shard whose every image was unreadable)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return fh.get_slice("labels").get_shape()[0] if "labels" in fh.keys() else 0


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_header(path: str) -> dict:
    """The extraction record of a shard's header (``{}`` for a shard of an older version, which has none)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:  # the header only
        header = fh.metadata() or {}
    return json.loads(header["extraction"]) if "extraction" in header else {}


# ----------------------------------------------------------------------------------------------------------------
# Writer


def write_shard(path: str, tensors: Dict[str, torch.Tensor], settings: dict, skipped: int) -> None:
    """Write one shard atomically (a temporary file, then a rename: a killed run never leaves a half shard).

    ``tensors``: ``mean``, ``std``, ``mean_flip``, ``std_flip`` (those there are), ``labels``, ``indices``;
    ``settings``: the extraction settings every shard of the folder shares; ``skipped``: unreadable images.
    """
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    # One header key: safetensors writes several in a random order, and a rerun must write the same bytes
    header = {"settings": settings, "skipped": skipped}
    save_file(tensors, tmp, metadata={"extraction": json.dumps(header, sort_keys=True)})
    os.replace(tmp, path)


def existing_latents(output_dir: str) -> Tuple[Optional[dict], Dict[str, Optional[dict]]]:
    """``(metadata.json or None, {shard name: its settings or None})`` of the latents already in ``output_dir``."""
    meta = None
    meta_path = os.path.join(output_dir, METADATA)
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
    shards = {}
    names = sorted(n for n in os.listdir(output_dir) if SHARD_RE.match(n)) if os.path.isdir(output_dir) else []
    for name in names:
        try:
            header = _shard_header(os.path.join(output_dir, name))
        except Exception as err:
            raise UsageError(
                f"{os.path.join(output_dir, name)} is damaged ({type(err).__name__}: {err}): delete it (a rerun "
                "encodes it again) or pass --overwrite_output_dir to extract everything again."
            ) from err
        shards[name] = header.get("settings")
    return meta, shards


def check_existing_latents(output_dir: str, settings: dict, ae_name: str) -> int:
    """Refuse an ``output_dir`` whose metadata.json or any shard was made by other weights or settings.

    Returns how many shards are already there (all made like this run: a rerun resumes them).
    """
    meta, shards = existing_latents(output_dir)
    fix = "Choose a new --output_dir, or pass --overwrite_output_dir to delete them and extract again."
    sources = ([(METADATA, meta.get("extraction"))] if meta is not None else []) + list(shards.items())
    old_format = [name for name, old in sources if old is None]
    if old_format:
        raise UsageError(
            f"--output_dir {output_dir} holds latents written by an older version of extract_latents.py "
            f"({', '.join(old_format[:3])}{', ...' if len(old_format) > 3 else ''}) that records no weights "
            f"fingerprint, so the autoencoder they came from cannot be checked. {fix}"
        )
    for name, old in sources:
        diffs = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if not diffs:
            continue
        shown = []
        for k in diffs:
            if k == "ae_weights_fingerprint":
                made_by = f" ({meta['ae']})" if meta and meta.get("ae") else ""
                shown.append(f"autoencoder weights {old.get(k)}{made_by} there, {settings[k]} ({ae_name}) in this run")
            else:
                shown.append(f"{k} {old.get(k)!r} there, {settings.get(k)!r} in this run")
        raise UsageError(
            f"--output_dir {output_dir} holds latents made by another autoencoder or with other settings ({name}: "
            f"{'; '.join(shown)}): they cannot be mixed with this run's. {fix}"
        )
    return len(shards)


def remove_latents(output_dir: str) -> None:
    """Delete the shards (also unfinished ``.tmp`` ones) and metadata.json of ``output_dir`` (--overwrite_output_dir)."""
    for name in os.listdir(output_dir):
        if SHARD_RE.match(name) or name.startswith("shard-") and name.endswith(".tmp") or name == METADATA:
            os.remove(os.path.join(output_dir, name))


def latent_statistics(shard_paths: Iterable[str], per_position: bool = False):
    """Mean and std of the latents the DiT trains on, and of the posterior means, over every shard: per channel
    (``(C,)``), or with ``per_position`` per latent element (``(C, [T',] h, w)``, the authors' code's option of
    statistics per ``(t, c, h, w)``).

    The DiT sees posterior samples ``z = mean + std * eps`` (App. B: "posterior sampling from the encoder
    distribution"), of the flipped images half of the time when flips are stored; the authors' code likewise
    computes its latent statistics on the latents the DiT sees. Their moments are exact without drawing ``eps``:
    ``E[z] = E[mean]`` and ``E[z^2] = E[mean^2] + E[std^2]`` (float64 sums over images, positions unless
    ``per_position``, and, when stored, both flips). Returns ``(samples: (mean, std), means: (mean, std), has_std,
    stored rows, skipped images)``. Image latents are ``(N, C, h, w)``, video latents ``(N, C, T', h, w)``.
    """
    from safetensors import safe_open

    count, sums, skipped, stored, has_std = 0, None, 0, 0, False
    for path in shard_paths:
        with safe_open(path, "pt") as fh:
            skipped += json.loads(fh.metadata()["extraction"])["skipped"]
            if "mean" not in fh.keys():  # an all-unreadable shard
                continue
            has_std = "std" in fh.keys()
            suffixes = ["", "_flip"] if "mean_flip" in fh.keys() else [""]
            for suffix in suffixes:
                mean = fh.get_tensor("mean" + suffix).double()  # (N, C, [T',] h, w)
                var = fh.get_tensor("std" + suffix).double().square() if has_std else torch.zeros_like(mean)
                dims = [0] if per_position else [0] + list(range(2, mean.ndim))
                part = torch.stack([mean.sum(dims), mean.square().sum(dims), var.sum(dims)])  # (3, C[, T', h, w])
                sums = part if sums is None else sums + part
                count += mean.shape[0] if per_position else mean.numel() // mean.shape[1]
            stored += mean.shape[0]
    if sums is None:
        raise ValueError("Every image was unreadable: there are no latents to compute statistics of.")
    channel_mean, mean_sq, posterior_var = sums / count
    means_std = (mean_sq - channel_mean.square()).clamp_min(1e-12).sqrt()
    samples_std = (mean_sq + posterior_var - channel_mean.square()).clamp_min(1e-12).sqrt()
    return (channel_mean, samples_std), (channel_mean, means_std), has_std, stored, skipped


def normalization_tensors(meta: dict, device=None):
    """``(mean, std)`` of ``metadata.json``, shaped to broadcast over a batch of latents ``(B, C, [T',] h, w)``:
    ``(1, C, 1, ...)`` for per-channel statistics, ``(1, C, [T',] h, w)`` for per-position ones."""
    mean = torch.tensor(meta["latents_mean"], dtype=torch.float32, device=device)
    std = torch.tensor(meta["latents_std"], dtype=torch.float32, device=device)
    ndim = len(meta["latent_shape"])  # C, [T',] h, w
    shape = (1, *mean.shape) if mean.ndim == ndim else (1, -1, *[1] * (ndim - 1))
    return mean.view(shape), std.view(shape)


def write_metadata(
    output_dir: str,
    shard_names: Sequence[str],
    settings: dict,
    *,
    ae: str,
    ae_class: str,
    latent_shape: Sequence[int],
    class_names: Sequence[str],
    dataset: str,
    requested_samples: int,
    per_position: bool = False,
    num_frames: Optional[int] = None,
) -> dict:
    """Write ``metadata.json`` of ``output_dir`` (atomically) once every shard is there, and return it: the
    statistics of :func:`latent_statistics` over the shards, the class names and the dataset description.

    ``settings`` are the extraction settings every shard's header records (with ``resolution``, ``flip`` and
    ``ae_weights_fingerprint``); ``ae`` names the autoencoder for people, ``ae_class`` is its diffusers class.
    ``latent_shape`` is ``[C, h, w]`` for images, ``[C, T', h, w]`` for clips of ``num_frames`` frames (``video``
    is then true); ``per_position`` records statistics per latent element instead of per channel.
    """
    paths = [os.path.join(output_dir, n) for n in shard_names]
    (channel_mean, channel_std), (_, means_std), has_std, stored, skipped = latent_statistics(paths, per_position)
    files = {n: {"rows": _shard_rows(p), "bytes": os.path.getsize(p), "sha256": _sha256(p)}
             for n, p in zip(shard_names, paths)}  # fmt: skip
    flip = bool(settings["flip"])
    meta = {
        "ae": ae,
        "ae_class": ae_class,
        "ae_weights_fingerprint": settings["ae_weights_fingerprint"],
        "resolution": settings["resolution"],
        "latent_shape": list(latent_shape),
        "video": len(latent_shape) == 4,
        "num_frames": num_frames,
        "statistics_per": "position" if per_position else "channel",
        "num_samples": stored,
        "skipped_images": skipped,
        "num_classes": len(class_names),
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "latents_mean": channel_mean.tolist(),
        "latents_std": channel_std.tolist(),  # of posterior samples: what the DiT normalises with
        "latent_statistics": "posterior samples z = mean + std * eps" + (" and their flips" if flip else ""),
        "posterior_means_std": means_std.tolist(),  # for reference: the std of the posterior means alone
        "has_std": has_std,
        "flip": flip,
        "shards": list(shard_names),
        "shard_files": files,  # rows, size and digest of each shard: checked before training (rows, size)
        "dataset": dataset,
        "requested_samples": requested_samples,
        "extraction": settings,  # what every shard's header records too (see check_existing_latents)
    }
    atomic_write_json(os.path.join(output_dir, METADATA), meta)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Readers


def read_latents_metadata(folder: str, flag: str = "--latents_dir") -> dict:
    """``metadata.json`` of an extract_latents.py folder, checked against the header of every shard it lists.

    Raises a :class:`MissingPathError` for a missing folder, metadata or shard and a :class:`UsageError` for a
    folder written by an older version (no weights fingerprint) or a shard that other autoencoder weights encoded;
    ``flag`` names the argument that gave ``folder`` in the messages.
    """
    if not os.path.isdir(folder):
        raise MissingPathError(f"{flag} {folder} is not a folder: run train_scripts/extract_latents.py.")
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
        raise MissingPathError(
            f"{flag} {folder} has no metadata.json: give a folder written by train_scripts/extract_latents.py."
        )
    again = f"extract {folder} again (extract_latents.py --overwrite_output_dir)"
    try:
        with open(path) as fh:
            meta = json.load(fh)
        meta["shards"], meta["num_samples"], meta["latent_shape"]  # noqa: B018 (the keys every reader needs)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}: {err}): {again}.") from None
    if "ae_weights_fingerprint" not in meta:
        raise UsageError(
            f"{folder} was written by an older version of extract_latents.py that records no weights fingerprint, "
            "so the autoencoder these latents came from cannot be checked: extract them again "
            "(extract_latents.py --overwrite_output_dir)."
        )
    unlisted = sorted(n for n in os.listdir(folder) if SHARD_RE.match(n) and n not in meta["shards"])
    if unlisted:
        raise UsageError(
            f"{path} lists {len(meta['shards'])} shards but {folder} holds {len(unlisted)} more ({unlisted[0]}, ...): "
            f"the metadata was edited or belongs to another extraction; {again}."
        )
    rows, files = 0, meta.get("shard_files", {})
    for name in meta["shards"]:
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise MissingPathError(f"{shard} is missing: run extract_latents.py again to finish {folder}.")
        try:
            found = _shard_header(shard).get("settings", {}).get("ae_weights_fingerprint")
            shard_rows = _shard_rows(shard)
        except Exception as err:  # a truncated file, a flipped header byte, ...
            raise UsageError(f"{shard} is damaged ({error_summary(err)}): {again}.") from None
        if found != meta["ae_weights_fingerprint"]:
            raise UsageError(
                f"{shard} was encoded by other autoencoder weights ({found}) than metadata.json says "
                f"({meta['ae_weights_fingerprint']}): extract {folder} again (--overwrite_output_dir)."
            )
        record = files.get(name, {})
        if record and (record.get("rows"), record.get("bytes")) != (shard_rows, os.path.getsize(shard)):
            raise UsageError(
                f"{shard} has {shard_rows} rows and {os.path.getsize(shard)} bytes, metadata.json recorded "
                f"{record.get('rows')} and {record.get('bytes')}: it was changed after extraction; {again}."
            )
        rows += shard_rows
    if rows != meta["num_samples"]:
        raise UsageError(
            f"{folder}'s shards hold {rows} latents and metadata.json says {meta['num_samples']}: the shard list or "
            f"the count was edited; {again}."
        )
    check_latent_statistics(meta, path)
    return meta


def check_latent_statistics(meta: dict, where: str) -> None:
    """Refuse normalisation statistics a DiT cannot train with: a non-finite mean, a std that is not finite and
    positive, or shapes that do not match the latents (per channel or per position)."""
    try:
        mean = torch.tensor(meta["latents_mean"], dtype=torch.float64)
        std = torch.tensor(meta["latents_std"], dtype=torch.float64)
        normalization_tensors(meta)
    except Exception as err:
        raise UsageError(f"{where}: latents_mean / latents_std are damaged ({type(err).__name__}: {err}).") from None
    if mean.shape != std.shape or not torch.isfinite(mean).all() or not (torch.isfinite(std) & (std > 0)).all():
        raise UsageError(
            f"{where}: latents_std must be finite and positive and latents_mean finite, of one shape (the latents "
            "are divided by the std): extract the latents again (extract_latents.py --overwrite_output_dir)."
        )


def check_rows(mean: torch.Tensor, std: Optional[torch.Tensor], labels: torch.Tensor, num_classes: int, shard: str,
               first_row: int = 0) -> None:  # fmt: skip
    """Refuse rows with a non-finite posterior mean or std, or a label outside ``[0, num_classes)``, naming the
    shard and the row (a NaN row would otherwise be skipped as a non-finite training step, silently)."""
    finite = torch.isfinite(mean).flatten(1).all(1)
    if std is not None:
        finite &= torch.isfinite(std).flatten(1).all(1)
    if not finite.all():
        row = first_row + int((~finite).nonzero()[0])
        raise UsageError(
            f"{shard}, row {row}, holds non-finite latents (NaN or inf): the encoder overflowed or the file was "
            "damaged; extract the latents again (extract_latents.py --overwrite_output_dir, in fp32)."
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = first_row + int(bad.nonzero()[0])
        raise UsageError(
            f"{shard}, row {row}, has class {int(labels[row - first_row])}, outside the {num_classes} classes that "
            "metadata.json names: the metadata was edited, or belongs to other latents; extract them again."
        )


class LatentShards(torch.utils.data.Dataset):
    """The rows of a folder's shards, read lazily (memory-mapped): ``{"mean", "std", "label"}`` per item, ``mean``
    and ``std`` ``(C, h, w)`` float32 (``std`` zeros for a deterministic encoder).

    With flips stored, an item is the mirrored image's posterior half of the time, drawn from ``(seed, epoch,
    index)`` (set ``epoch`` before each epoch): the usual horizontal-flip augmentation, the same in a resumed run.

    Args:
        latents_dir: the folder; meta: its :func:`read_latents_metadata`; seed: the flip draws' seed.
    """

    def __init__(self, latents_dir: str, meta: dict, seed: int = 0):
        from safetensors import safe_open

        self.paths = [os.path.join(latents_dir, s) for s in meta["shards"]]
        self.files = [safe_open(p, "pt") for p in self.paths]
        self.rows = [(k, r) for k, fh in enumerate(self.files) for r in range(fh.get_slice("labels").get_shape()[0])]
        self.has_std, self.flip, self.seed, self.epoch = meta["has_std"], meta["flip"], seed, 0
        self.num_classes = meta["num_classes"]
        for path, fh in zip(self.paths, self.files):  # every label, before training (cheap: one integer per row)
            if "labels" in fh.keys():
                labels = fh.get_tensor("labels")
                check_rows(torch.zeros(len(labels), 1), None, labels, self.num_classes, path)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        k, r = self.rows[index]
        fh = self.files[k]
        suffix = "_flip" if self.flip and random.Random(hash((self.seed, self.epoch, index))).random() < 0.5 else ""
        mean = fh.get_slice("mean" + suffix)[r : r + 1].float()  # (1, C, [T',] h, w)
        std = fh.get_slice("std" + suffix)[r : r + 1].float() if self.has_std else torch.zeros_like(mean)
        labels = fh.get_slice("labels")[r : r + 1]
        check_rows(mean, std, labels, self.num_classes, self.paths[k], first_row=r)
        return {"mean": mean[0], "std": std[0], "label": int(labels[0])}

    def __getstate__(self):  # safe_open handles do not pickle
        raise TypeError("LatentShards keeps its shards open and cannot be pickled: read it with num_workers=0.")


def read_latent_rows(
    latents_dir: str, meta: dict, max_rows: int, flag: str = "--latents_dir"
) -> Dict[str, torch.Tensor]:
    """The first ``max_rows`` rows of the shards at once (shard order, never flipped): ``mean`` and ``std`` (zeros for
    a deterministic encoder) float32 ``(n, C, h, w)``, ``labels`` int64 ``(n,)``. Shards whose every image was
    unreadable are passed over; a folder with no rows at all raises a :class:`UsageError` naming ``flag``."""
    from safetensors import safe_open

    parts = {"mean": [], "std": [], "labels": []}
    count = 0
    for name in meta["shards"]:
        if count >= max_rows:
            break
        with safe_open(os.path.join(latents_dir, name), "pt") as fh:
            if "mean" not in fh.keys():  # every image of this shard was unreadable
                continue
            take = min(max_rows - count, fh.get_slice("labels").get_shape()[0])
            mean = fh.get_slice("mean")[:take].float()
            std = fh.get_slice("std")[:take].float() if "std" in fh.keys() else torch.zeros_like(mean)
            labels = fh.get_slice("labels")[:take].long()
            check_rows(mean, std, labels, meta["num_classes"], os.path.join(latents_dir, name))
            parts["mean"].append(mean)
            parts["std"].append(std)
            parts["labels"].append(labels)
            count += take
    if count == 0:
        raise UsageError(f"{flag} {latents_dir} holds no latents: extract some first.")
    return {k: torch.cat(v) for k, v in parts.items()}


def check_latents_autoencoder(
    meta: dict,
    latents_dir: str,
    vae_name: str,
    vae_config: Optional[dict] = None,
    vae_fingerprint: Optional[str] = None,
) -> None:
    """Refuse latents that another autoencoder encoded than ``vae_name`` (--pretrained_vae_model_name_or_path): by
    class and channels from ``vae_config`` (cheap, before any weights load), by *weights* from ``vae_fingerprint``
    (:func:`diffusability_hf.autoencoders.weights_fingerprint`)."""
    fix = "pass the autoencoder the latents were extracted with, or"
    if vae_config is not None and (meta["ae_class"], meta["latent_shape"][0]) != (
        vae_config["_class_name"],
        ae.latent_channels(vae_config),
    ):
        raise UsageError(
            f"{latents_dir} holds latents of another autoencoder ({meta['ae']}, {meta['ae_class']}, "
            f"{meta['latent_shape'][0]} channels) than --pretrained_vae_model_name_or_path {vae_name} "
            f"({vae_config['_class_name']}, {ae.latent_channels(vae_config)} channels): {fix} extract them again with "
            "this one."
        )
    if vae_fingerprint is not None and meta["ae_weights_fingerprint"] != vae_fingerprint:
        raise UsageError(
            f"{latents_dir} holds latents of other autoencoder weights ({meta['ae']}, fingerprint "
            f"{meta['ae_weights_fingerprint']}) than --pretrained_vae_model_name_or_path {vae_name} (fingerprint "
            f"{vae_fingerprint}): {fix} extract them again with this one (the pipeline would otherwise decode with "
            "a decoder that the DiT's latents were not made by)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Latents encoded during training (no shards): what extraction would have written


def on_the_fly_metadata(vae_name: str, vae_config: dict, resolution: int, class_names: Sequence[str], dataset) -> dict:
    """The metadata of images encoded while the DiT trains (``dataset`` names them), as :func:`write_metadata`
    would record it for extracted latents; the statistics come from :func:`estimate_latent_statistics`."""
    f = ae.spatial_compression(vae_config)
    if resolution % f:
        raise UsageError(f"--resolution {resolution} is not divisible by the AE's compression {f}.")
    return {
        "ae": vae_name,
        "ae_class": vae_config["_class_name"],
        "latent_shape": [ae.latent_channels(vae_config), resolution // f, resolution // f],
        "num_classes": len(class_names),
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "dataset": dataset,
    }


@torch.no_grad()
def estimate_latent_statistics(vae, dataset, num_images: int, batch_size: int, seed: int, device, collate_fn=None):
    """Per-channel mean/std of the posterior samples (what the DiT sees, as :func:`latent_statistics` computes them
    for shards) of ``num_images`` images of ``dataset`` in a seeded order: ``E[z] = E[mean]``,
    ``E[z^2] = E[mean^2] + E[std^2]`` (float64). Batches are ``{"pixels": (B, 3, R, R)}``. Returns two lists."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    take = order[:num_images].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, take), batch_size=batch_size, collate_fn=collate_fn
    )
    s1 = s2 = n = 0
    for batch in loader:
        post = ae.encode(vae, batch["pixels"].to(device))
        z = post.mean.double()  # (B, C, h, w)
        var = post.std.double().square() if post.std is not None else torch.zeros_like(z)
        s1, s2, n = s1 + z.sum((0, 2, 3)), s2 + (z.square() + var).sum((0, 2, 3)), n + z.numel() // z.shape[1]
    mean = s1 / n
    return mean.tolist(), (s2 / n - mean.square()).clamp_min(1e-12).sqrt().tolist()

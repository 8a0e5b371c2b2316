"""The latent shard format of ``train_scripts/extract_latents.py``, as its readers see it: ``metadata.json`` (the
autoencoder by its weights fingerprint, the class names, the per-channel statistics of the posterior samples, the
shard list) and safetensors shards whose headers repeat the fingerprint and the extraction settings."""

import json
import os

from .training_utils import MissingPathError, UsageError


def read_latents_metadata(folder: str, flag: str = "--latents_dir") -> dict:
    """``metadata.json`` of an extract_latents.py folder, checked against the header of every shard it lists.

    Raises a :class:`MissingPathError` for a missing folder, metadata or shard and a :class:`UsageError` for a
    folder written by an older version (no weights fingerprint) or a shard that other autoencoder weights encoded;
    ``flag`` names the argument that gave ``folder`` in the messages.
    """
    from safetensors import safe_open

    if not os.path.isdir(folder):
        raise MissingPathError(f"{flag} {folder} is not a folder: run train_scripts/extract_latents.py.")
    path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(path):
        raise MissingPathError(
            f"{flag} {folder} has no metadata.json: give a folder written by train_scripts/extract_latents.py."
        )
    with open(path) as fh:
        meta = json.load(fh)
    if "ae_weights_fingerprint" not in meta:
        raise UsageError(
            f"{folder} was written by an older version of extract_latents.py that records no weights fingerprint, "
            "so the autoencoder these latents came from cannot be checked: extract them again "
            "(extract_latents.py --overwrite_output_dir)."
        )
    for name in meta["shards"]:
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise MissingPathError(f"{shard} is missing: run extract_latents.py again to finish {folder}.")
        with safe_open(shard, "pt") as fh:  # the header only
            header = fh.metadata() or {}
        found = (
            json.loads(header["extraction"])["settings"]["ae_weights_fingerprint"] if "extraction" in header else None
        )
        if found != meta["ae_weights_fingerprint"]:
            raise UsageError(
                f"{shard} was encoded by other autoencoder weights ({found}) than metadata.json says "
                f"({meta['ae_weights_fingerprint']}): extract {folder} again (--overwrite_output_dir)."
            )
    return meta

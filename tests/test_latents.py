"""The latent shard format (diffusability_hf.data.latents) on hand-made shards: writer, metadata, and both readers."""

import json
import pickle

import pytest
import torch

from diffusability_hf.data.latents import (
    LatentShards,
    check_existing_latents,
    read_latent_rows,
    read_latents_metadata,
    remove_latents,
    shard_name,
    write_metadata,
    write_shard,
)
from diffusability_hf.errors import UsageError

SETTINGS = {"ae_weights_fingerprint": "f" * 16, "resolution": 16, "flip": True}


def rows(n, offset=0, channels=2):
    """``n`` shard rows: means ``offset + i`` per row, std 0.5 (their flips: negated means), labels ``i % 3``."""
    mean = (offset + torch.arange(n, dtype=torch.float32)).view(-1, 1, 1, 1).expand(n, channels, 2, 2).contiguous()
    std = torch.full_like(mean, 0.5)
    labels = torch.arange(offset, offset + n) % 3
    return {
        "mean": mean,
        "std": std,
        "mean_flip": -mean,
        "std_flip": std.clone(),
        "labels": labels,
        "indices": labels + 0,
    }


@pytest.fixture
def folder(tmp_path):
    """Three shards: 3 rows, an all-unreadable one, 2 rows; and their metadata.json."""
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "indices": torch.zeros(0, dtype=torch.int64)}
    for j, (tensors, skipped) in enumerate([(rows(3), 0), (empty, 4), (rows(2, offset=3), 1)]):
        write_shard(str(tmp_path / shard_name(j)), tensors, SETTINGS, skipped=skipped)
    names = [shard_name(j) for j in range(3)]
    meta = write_metadata(
        str(tmp_path), names, SETTINGS, ae="ae", ae_class="AutoencoderKL", latent_shape=[2, 2, 2],
        class_names=["a", "b", "c"], dataset="d", requested_samples=10,
    )  # fmt: skip
    return tmp_path, meta


def test_write_and_read_back(folder):
    path, meta = folder
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", *(shard_name(j) for j in range(3))]
    assert read_latents_metadata(str(path)) == meta == json.loads((path / "metadata.json").read_text())
    assert (meta["num_samples"], meta["skipped_images"], meta["has_std"], meta["flip"]) == (5, 5, True, True)
    assert meta["id2label"] == {"0": "a", "1": "b", "2": "c"} and meta["extraction"] == SETTINGS
    # Posterior samples of the rows and of their flips: mean 0 (+-k pairs), E[z^2] = mean(k^2) + 0.25
    torch.testing.assert_close(torch.tensor(meta["latents_mean"]), torch.zeros(2))
    torch.testing.assert_close(torch.tensor(meta["latents_std"]), torch.full((2,), (30 / 5 + 0.25) ** 0.5))
    torch.testing.assert_close(torch.tensor(meta["posterior_means_std"]), torch.full((2,), (30 / 5) ** 0.5))
    # A rerun writes the same bytes (one header key, sorted)
    before = (path / shard_name(0)).read_bytes()
    write_shard(str(path / shard_name(0)), rows(3), SETTINGS, skipped=0)
    assert (path / shard_name(0)).read_bytes() == before and not list(path.glob("*.tmp"))
    assert check_existing_latents(str(path), SETTINGS, "ae") == 3
    with pytest.raises(UsageError, match="resolution 16 there, 32 in this run"):
        check_existing_latents(str(path), {**SETTINGS, "resolution": 32}, "ae")
    remove_latents(str(path))
    assert list(path.iterdir()) == []


def test_latent_shards_rows_and_seeded_flips(folder):
    path, meta = folder
    data = LatentShards(str(path), meta, seed=1)
    assert len(data) == 5
    item = data[4]
    assert set(item) == {"mean", "std", "label"} and item["mean"].shape == (2, 2, 2) and item["label"] == 4 % 3
    assert item["mean"].abs().max() == 4 and bool((item["std"] == 0.5).all())

    def signs(epoch, seed=1):
        data.epoch, data.seed = epoch, seed
        return [int(data[i]["mean"].sum().sign()) for i in range(1, 5)]  # row 0 is 0 either way

    assert signs(0) == signs(0) and {s for e in range(4) for s in signs(e)} == {-1, 1}  # flipped half the time
    assert any(signs(0) != signs(e) for e in range(1, 4))  # drawn again each epoch
    assert any(signs(0) != signs(0, seed) for seed in range(2, 8))  # and per seed
    without = LatentShards(str(path), {**meta, "flip": False, "has_std": False})
    assert all(without[i]["mean"].sum() >= 0 and without[i]["std"].abs().sum() == 0 for i in range(5))
    with pytest.raises(TypeError, match="num_workers=0"):
        pickle.dumps(data)


def test_read_latent_rows(folder):
    path, meta = folder
    first = read_latent_rows(str(path), meta, 4)
    assert first["mean"].shape == (4, 2, 2, 2) and first["labels"].dtype == torch.int64
    assert first["mean"][:, 0, 0, 0].tolist() == [0, 1, 2, 3]  # shard order, never flipped, the empty shard passed
    assert first["labels"].tolist() == [0, 1, 2, 0] and bool((first["std"] == 0.5).all())
    assert len(read_latent_rows(str(path), meta, 100)["labels"]) == 5
    with pytest.raises(UsageError, match="--loss_latents_dir .* holds no latents: extract some first"):
        read_latent_rows(str(path), {**meta, "shards": [shard_name(1)]}, 4, "--loss_latents_dir")


def test_per_position_statistics_and_their_broadcast_shapes(tmp_path):
    """Per-position statistics (the authors' per (t, c, h, w) option) of video latents (N, C, T', h, w) against
    numpy; normalization_tensors broadcasts both kinds over a batch."""
    import numpy as np

    from diffusability_hf.data.latents import latent_statistics, normalization_tensors, write_shard

    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(6, 2, 3, 4, 4, generator=gen), torch.rand(6, 2, 3, 4, 4, generator=gen) + 0.1
    path = str(tmp_path / "shard-00000.safetensors")
    write_shard(path, {"mean": mean, "std": std, "labels": torch.zeros(6, dtype=torch.int64)}, {"x": 1}, skipped=0)
    (m, s), (_, ms), has_std, stored, skipped = latent_statistics([path], per_position=True)
    assert m.shape == s.shape == (2, 3, 4, 4) and has_std and (stored, skipped) == (6, 0)
    mu, sd = mean.double().numpy(), std.double().numpy()
    np.testing.assert_allclose(m.numpy(), mu.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.numpy() ** 2, (mu**2 + sd**2).mean(0) - mu.mean(0) ** 2, rtol=1e-9)
    np.testing.assert_allclose(ms.numpy(), mu.std(0), rtol=1e-9)
    (c, _), _, _, _, _ = latent_statistics([path])
    assert c.shape == (2,) and np.allclose(c.numpy(), mu.mean((0, 2, 3, 4)))
    per_channel = {"latent_shape": [2, 3, 4, 4], "latents_mean": c.tolist(), "latents_std": [1.0, 2.0]}
    assert [t.shape for t in normalization_tensors(per_channel)] == [(1, 2, 1, 1, 1)] * 2
    per_position = {"latent_shape": [2, 3, 4, 4], "latents_mean": m.tolist(), "latents_std": s.tolist()}
    assert [t.shape for t in normalization_tensors(per_position)] == [(1, 2, 3, 4, 4)] * 2
    image = {"latent_shape": [2, 4, 4], "latents_mean": [0.0, 1.0], "latents_std": [1.0, 2.0]}
    assert normalization_tensors(image)[1].shape == (1, 2, 1, 1)

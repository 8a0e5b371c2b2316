"""Data: images, videos, evaluation sets, shard streams and latent shards."""

"""Media for the trackers (tracking.py): clips as GIFs, and images, clips and spectra written to TensorBoard."""

import io
import types

import numpy as np
import torch
from PIL import Image

from diffusability_hf.tracking import (
    clips_to_gif,
    log_clips,
    log_frame_profiles,
    log_image_grid,
    log_images,
    log_spectra,
    to_uint8_frames,
)


def test_to_uint8_frames_layout():
    clips = torch.rand(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some out of range
    got = to_uint8_frames(clips)
    assert got.shape == (4, 5, 12, 3) and got.dtype == np.uint8
    ref = np.rint((np.clip(clips.double().numpy(), -1, 1) + 1) * 127.5)
    for n in range(2):
        for t in range(4):
            np.testing.assert_array_equal(got[t, :, n * 6 : (n + 1) * 6], ref[n, :, t].transpose(1, 2, 0))


def test_clips_to_gif_decodes_to_the_clips():
    g = torch.Generator().manual_seed(0)
    clips, recon = torch.rand(2, 3, 4, 8, 10, generator=g) * 2 - 1, torch.rand(2, 3, 4, 8, 10, generator=g) * 2 - 1
    ref = np.concatenate([to_uint8_frames(clips), to_uint8_frames(recon)], axis=1).astype(int)  # (T, 2H, N*W, 3)
    gif = Image.open(io.BytesIO(clips_to_gif(clips, recon, fps=5)))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (20, 16)
    assert abs(gif.info["duration"] - 200) <= 10
    for t in range(4):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB")).astype(int)
        assert np.abs(frame - ref[t]).mean() < 8  # palette quantisation only
        assert np.abs(frame[:8] - ref[t, 8:]).mean() > 40  # clips on top, recon below
    alone = Image.open(io.BytesIO(clips_to_gif(clips)))
    assert alone.n_frames == 4 and alone.size == (20, 8)
    alone.seek(2)
    assert np.abs(np.asarray(alone.convert("RGB")).astype(int) - ref[2, :8]).mean() < 8


def test_images_clips_and_spectra_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    trackers = [types.SimpleNamespace(name="tensorboard", writer=writer), types.SimpleNamespace(name="other")]
    g = torch.Generator().manual_seed(0)
    pixels, clips = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1
    log_images(trackers, pixels, -pixels, step=1)
    gif = log_clips(trackers, clips, clips.flip(2), step=1)
    profile = np.linspace(1, 0.1, 16).tolist()
    log_spectra(trackers, "validation/spectrum_image", {"RGB": profile}, {"RGB": profile}, step=1)
    log_frame_profiles(trackers, "validation/spectrum_per_frame", [profile, profile], step=1)
    grid = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    log_image_grid(trackers, "validation/samples", grid, step=1)
    writer.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    images = set(events.Tags()["images"])
    assert {"validation/spectrum_image", "validation/spectrum_per_frame", "validation/reconstruction_clips"} <= images
    assert "validation/reconstruction" in images
    logged_grid = Image.open(io.BytesIO(events.Images("validation/samples")[-1].encoded_image_string))
    assert np.array_equal(np.asarray(logged_grid.convert("RGB")), np.asarray(grid))
    logged = events.Images("validation/reconstruction_clips")[-1].encoded_image_string
    assert logged == gif and Image.open(io.BytesIO(gif)).n_frames == 3

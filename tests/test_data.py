"""Datasets: the embedded photographs, image folders with corrupt files (data/images.py); videos, camera pans, joint
batches (data/videos.py)."""

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffusability_hf.data.images import (
    EMBEDDED_TRAIN_IMAGES,
    EMBEDDED_VALIDATION_IMAGES,
    EmbeddedPhotoCrops,
    HFImageDataset,
    SkipLog,
    collate,
    embedded_validation_batch,
    hold_out,
    load_embedded_image,
    load_image_dataset,
)
from diffusability_hf.data.videos import (
    EmbeddedPanClips,
    JointBatches,
    LabelledClips,
    VideoClips,
    clip_to_tensor,
    embedded_gif_path,
    embedded_validation_clips,
    list_videos,
    load_video_dataset,
    pan_clip,
    read_clip,
    unwrap_batch,
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
    assert [where for where, _ in batch["skipped"]] == [str(tmp_path / "3.png")]


# ----------------------------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------------------------

H, W = 16, 24  # frame size of the synthetic videos: resolution 16 needs no resize, only a crop (left in 0..8)


def level(t: int) -> int:
    """Grey level of frame ``t`` in the synthetic videos: the frame index is encoded in the brightness."""
    return 10 * t + 5


def index_frames(n: int, offset: int = 0) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 uniform grey frames, frame ``t`` at ``level(t + offset)``."""
    return np.stack([np.full((H, W, 3), level(t + offset), np.uint8) for t in range(n)])


def frame_indices(frames, offset: int = 0, tol: float = 0.0) -> list:
    """Inverse of ``index_frames`` for ``(T, H, W, 3)`` uint8 frames or a ``(3, T, R, R)`` clip in [-1, 1]."""
    if torch.is_tensor(frames):
        values = ((frames.double() + 1) * 127.5).transpose(0, 1).flatten(1)  # (T, 3*R*R)
    else:
        values = torch.from_numpy(frames.reshape(frames.shape[0], -1).astype(np.float64))
    out = []
    for v in values:
        assert v.max() - v.min() <= 2 * tol + 1e-3  # uniform frame
        t = (v.mean().item() - 5) / 10
        assert abs(t - round(t)) * 10 <= tol + 1e-3
        out.append(round(t) - offset)
    return out


def write_gif(path, frames: np.ndarray):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def write_png_folder(folder, frames: np.ndarray):
    folder.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{t:04d}.png")
    (folder / "notes.txt").write_text("not a frame")


def write_mp4(path, frames: np.ndarray, fps: int = 8):
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def videos(tmp_path):
    """12-frame synthetic videos in every supported form; frame t has grey level 10t + 5."""
    frames = index_frames(12)
    write_gif(tmp_path / "clip.gif", frames)
    write_png_folder(tmp_path / "frames", frames)
    write_mp4(tmp_path / "clip.mp4", frames)
    return {
        "gif": str(tmp_path / "clip.gif"),
        "gif_bytes": (tmp_path / "clip.gif").read_bytes(),
        "folder": str(tmp_path / "frames"),
        "mp4": str(tmp_path / "clip.mp4"),
    }


@pytest.mark.parametrize("kind", ["gif", "gif_bytes", "folder"])
def test_read_clip_picks_every_stride_th_frame_exactly(videos, kind):
    source = videos[kind]
    first = read_clip(source, 4, 3, random.Random(0), random_start=False)
    assert first.shape == (4, H, W, 3) and first.dtype == np.uint8
    assert frame_indices(first) == [0, 3, 6, 9]
    assert frame_indices(read_clip(source, 12, 1, random.Random(0), random_start=True)) == list(range(12))
    starts = set()
    for seed in range(40):  # span 1 + 3 * 3 = 10 of 12 frames: the start is 0, 1 or 2
        got = frame_indices(read_clip(source, 4, 3, random.Random(seed), random_start=True))
        assert got == [got[0] + 3 * j for j in range(4)]
        starts.add(got[0])
    assert starts == {0, 1, 2}
    assert frame_indices(read_clip(source, 6, 2, random.Random(0), random_start=False)) == [0, 2, 4, 6, 8, 10]


def test_read_clip_mp4(videos):
    frames = read_clip(videos["mp4"], 3, 5, random.Random(0), random_start=False)
    assert frames.shape == (3, H, W, 3) and frames.dtype == np.uint8
    assert frame_indices(frames, tol=3) == [0, 5, 10]  # yuv420p: grey levels within +-3


@pytest.mark.parametrize("kind", ["gif", "folder", "mp4"])
def test_read_clip_too_short_raises(videos, kind):
    with pytest.raises(ValueError, match="12 frames, fewer than the 13"):
        read_clip(videos[kind], 5, 3, random.Random(0))


def test_clip_to_tensor_same_crop_and_flip_for_every_frame():
    texture = np.random.default_rng(0).integers(0, 100, (H, W, 1)).repeat(3, axis=2)
    frames = np.stack([texture + 10 * t for t in range(4)]).astype(np.uint8)
    seen = set()
    for seed in range(20):
        clip = clip_to_tensor(frames, 16, center_crop=False, random_flip=True, rng=random.Random(seed))
        assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
        for t in range(4):  # every frame is frame 0 shifted by its brightness offset: the same crop and flip
            torch.testing.assert_close(clip[:, t] - clip[:, 0], torch.full((3, 16, 16), 10 * t / 127.5))
        frame0 = np.rint((clip[:, 0].numpy().transpose(1, 2, 0) + 1) * 127.5)
        matches = [
            (left, flip)
            for left in range(W - 16 + 1)
            for flip in (False, True)
            if np.array_equal(
                frame0, (texture[:, left : left + 16, :][:, ::-1] if flip else texture[:, left : left + 16])
            )
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len({left for left, _ in seen}) > 3 and {flip for _, flip in seen} == {False, True}
    centre = clip_to_tensor(frames, 16, center_crop=True, random_flip=False, rng=random.Random(0))
    expected = torch.from_numpy(frames[:, :, 4:20].astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)
    torch.testing.assert_close(centre, expected)


@pytest.mark.parametrize("kind", ["gif", "folder", "mp4"])
def test_video_clips_shapes_range_and_stride(videos, kind):
    ds = VideoClips([videos[kind]] * 2, resolution=16, num_frames=4, frame_stride=3, random_start=False)
    assert len(ds) == 2
    item = ds[1]
    clip = item["pixel_values"]
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32 and item["skipped"] == []
    assert clip.min() >= -1 and clip.max() <= 1
    assert frame_indices(clip, tol=0 if kind != "mp4" else 3) == [0, 3, 6, 9]
    random_start = VideoClips([videos[kind]], resolution=8, num_frames=4, frame_stride=3, seed=1)
    got = frame_indices(random_start[0]["pixel_values"], tol=0 if kind != "mp4" else 3)
    assert random_start[0]["pixel_values"].shape == (3, 4, 8, 8)
    assert got == [got[0] + 3 * j for j in range(4)] and 0 <= got[0] <= 2
    # the same index and epoch: the same start, read again from the file
    torch.testing.assert_close(random_start[0]["pixel_values"], random_start[0]["pixel_values"], rtol=0, atol=0)


def test_video_clips_hf_cells_bytes_and_path(videos):
    cells = [{"bytes": videos["gif_bytes"], "path": "clip.gif"}, {"bytes": None, "path": videos["gif"]}]
    ds = VideoClips(cells, resolution=16, num_frames=3, frame_stride=4, random_start=False)
    for i in range(2):
        assert ds[i]["skipped"] == []
        assert frame_indices(ds[i]["pixel_values"]) == [0, 4, 8]


def test_video_clips_skip_and_count_unreadable_and_short(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01garbage, not a video" * 50)
    write_gif(tmp_path / "short.gif", index_frames(3, offset=10))
    write_gif(tmp_path / "good.gif", index_frames(6, offset=2))
    sources = [str(tmp_path / n) for n in ("corrupt.mp4", "short.gif", "good.gif")]
    ds = VideoClips(sources, resolution=16, num_frames=5, frame_stride=1, random_start=False)
    for index, skipped in ((0, 2), (1, 1), (2, 0)):
        item = ds[index]
        assert [os.path.basename(w) for w, _ in item["skipped"]] == ["corrupt.mp4", "short.gif"][2 - skipped :]
        assert frame_indices(item["pixel_values"], offset=2) == [0, 1, 2, 3, 4]  # the clip of good.gif
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 5, 16, 16) and len(batch["skipped"]) == 3
    # corrupt bytes in an HF cell are skipped too
    cells = [{"bytes": b"garbage" * 30, "path": "x.mp4"}, {"bytes": (tmp_path / "good.gif").read_bytes(), "path": "g"}]
    assert VideoClips(cells, 16, 5, random_start=False)[0]["skipped"][0][0] == "x.mp4"
    bad = VideoClips(sources[:2], resolution=16, num_frames=5)
    with pytest.raises(RuntimeError, match="could not be read"):
        bad[0]
    with pytest.raises(ValueError):
        VideoClips([], 16, 5)


def test_list_videos(tmp_path):
    for name in ("b.mp4", "a.GIF", "notes.txt", "cover.png", "sub/c.webm", "sub/d.MKV", "sub/readme.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    write_png_folder(tmp_path / "frames", index_frames(2))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "a.txt").write_text("x")
    expected = sorted(str(tmp_path / n) for n in ("b.mp4", "a.GIF", "sub/c.webm", "sub/d.MKV", "frames"))
    assert list_videos(str(tmp_path)) == expected
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_videos(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no videos"):
        list_videos(str(tmp_path / "text_only"))
    with pytest.raises(ValueError, match="no videos"):
        list_videos(str(tmp_path / "empty"))


def test_load_video_dataset_local_videofolder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    write_mp4(data / "a.mp4", index_frames(6))
    write_mp4(data / "b.mp4", index_frames(9, offset=1))
    cells = load_video_dataset(str(data), None, cache_dir=str(tmp_path / "cache"))
    assert sorted(os.path.basename(c["path"]) for c in cells) == ["a.mp4", "b.mp4"]
    assert all(set(c) == {"bytes", "path"} for c in cells)  # undecoded cells
    ds = VideoClips(cells, resolution=16, num_frames=3, frame_stride=2, random_start=False)
    for i, cell in enumerate(cells):
        offset = 1 if cell["path"].endswith("b.mp4") else 0
        assert frame_indices(ds[i]["pixel_values"], offset=offset, tol=3) == [0, 2, 4]
    with pytest.raises(ValueError, match="--video_column 'nope'"):
        load_video_dataset(str(data), "nope", cache_dir=str(tmp_path / "cache"))


def gif_frames_resized(resolution: int) -> list:
    """The skimage GIF's frames, resized so that the shorter side is ``resolution`` (as resize_and_crop does)."""
    import av

    with av.open(embedded_gif_path()) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    h, w = frames[0].shape[:2]
    s = resolution / min(h, w)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    return [np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames]


def test_embedded_pan_clips_deterministic_and_moving():
    ds = EmbeddedPanClips(32, 4, names=("astronaut",), num_samples=8, seed=3)
    assert len(ds) == 8
    same = EmbeddedPanClips(32, 4, names=("astronaut",), num_samples=8, seed=3)
    other = EmbeddedPanClips(32, 4, names=("astronaut",), num_samples=8, seed=4)
    for i in (0, 1, 2):
        item = ds[i]
        clip = item["pixel_values"]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32 and item["skipped"] == []
        assert clip.min() >= -1 and clip.max() <= 1
        assert torch.equal(clip, same[i]["pixel_values"])
        assert not torch.equal(clip, other[i]["pixel_values"])
    assert not torch.equal(ds[0]["pixel_values"], ds[2]["pixel_values"])
    moving = EmbeddedPanClips(32, 8, names=("astronaut",), num_samples=8, seed=3)
    for i in (0, 2, 4):  # pans over the photograph (every 2nd clip is the GIF with one photograph)
        f = moving[i]["pixel_values"].transpose(0, 1).flatten(1).double().numpy()  # (T, 3*R*R)
        corr = np.corrcoef(f)
        for t in range(7):
            assert np.abs(f[t + 1] - f[t]).mean() > 0.005  # motion
            assert corr[t, t + 1] > 0.6  # a small step, not new content
        assert corr[0, 1] > corr[0, 7]  # drifting away: a pan


def test_embedded_pan_clips_gif_clip_is_made_of_gif_frames():
    ds = EmbeddedPanClips(32, 5, names=("astronaut",), num_samples=8, seed=0)
    ref = gif_frames_resized(32)
    rh, rw = ref[0].shape[:2]

    def as_uint8(frame):
        return np.rint((frame.numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)

    for index in (1, 3):  # k == len(names): the GIF
        clip = ds[index]["pixel_values"]
        assert clip.shape == (3, 5, 32, 32) and clip.min() >= -1 and clip.max() <= 1
        crops = []
        for t in range(5):
            frame = as_uint8(clip[:, t])
            hits = {
                (top, left, flip)
                for g in ref
                for top in range(rh - 32 + 1)
                for left in range(rw - 32 + 1)
                for flip in (False, True)
                if np.array_equal(frame, g[top : top + 32, left : left + 32][:, :: -1 if flip else 1])
            }
            assert hits, f"frame {t} of clip {index} is not a crop of a GIF frame"
            crops.append(hits)
        assert set.intersection(*crops)  # one crop and flip for the whole clip
    # A temporal crop of real motion: consecutive (looping) GIF frames. Give each a distinct grey, read it back
    ds.gif = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(24)]
    for index in (1, 3):
        clip = ds[index]["pixel_values"]
        levels = [round(((clip[:, t].mean().item() + 1) * 127.5) / 10) for t in range(5)]
        assert [(b - a) % 24 for a, b in zip(levels, levels[1:])] == [1, 1, 1, 1], levels
    # a pan clip (k = 0) is not made of GIF frames
    pan = as_uint8(ds[0]["pixel_values"][:, 0])
    assert not any(np.array_equal(pan, g[top : top + 32, :]) for g in ref for top in range(rh - 32 + 1))


def test_pan_clip_moves_in_a_straight_line_along_the_angle():
    """On a horizontal ramp the frame mean follows the window's x centre: linear in t, rising for angle 0,
    falling for angle pi, flat for a vertical ramp with a horizontal pan."""
    ramp = np.tile(np.linspace(0, 255, 400)[None, :, None], (300, 1, 3)).astype(np.uint8)
    for seed in range(3):
        means = {}
        for angle in (0.0, math.pi):
            clip = pan_clip(Image.fromarray(ramp), 32, 5, random.Random(seed), side=100, travel=1.0, angle=angle)
            assert clip.shape == (3, 5, 32, 32)
            m = clip.mean(dim=(0, 2, 3)).double().numpy()
            slope, intercept = np.polyfit(np.arange(5), m, 1)
            assert np.abs(slope * np.arange(5) + intercept - m).max() < 0.1 * abs(slope)
            means[angle] = slope
        assert means[0.0] > 0.02 and means[math.pi] < -0.02
        vertical = Image.fromarray(np.ascontiguousarray(ramp.transpose(1, 0, 2)))
        clip = pan_clip(vertical, 32, 5, random.Random(seed), side=100, travel=1.0, angle=0.0)
        assert np.ptp(clip.mean(dim=(0, 2, 3)).numpy()) < 0.005


def test_embedded_validation_clips_fixed():
    a, b = embedded_validation_clips(32, 3, 3), embedded_validation_clips(32, 3, 3)
    assert a.shape == (3, 3, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[0], a[2])  # same photograph, another pan
    assert not torch.equal(a[:, :, 0], a[:, :, 2])  # moving
    torch.testing.assert_close(embedded_validation_clips(32, 3, 2), a[:2], rtol=0, atol=0)


class FakeDataset(torch.utils.data.Dataset):
    """Item ``i`` is filled with the value ``i``; odd items report one skipped file."""

    def __init__(self, n, shape):
        self.n, self.shape = n, shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": torch.full(self.shape, float(i)), "skipped": [(f"file{i}", "bad")] * (i % 2)}


def ids(x: torch.Tensor) -> list:
    return [int(v) for v in x.flatten(1)[:, 0]]


def test_joint_batches_shapes_and_skip_counts():
    images, videos = FakeDataset(12, (3, 4, 4)), FakeDataset(6, (3, 5, 4, 4))
    jb = JointBatches(images, videos, image_batch_size=3, video_batch_size=2, seed=0)
    assert len(jb) == 4  # max(12 // 3, 6 // 2)
    loader = torch.utils.data.DataLoader(jb, batch_size=1, shuffle=False, collate_fn=unwrap_batch)
    for index, batch in enumerate(loader):
        assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["video_values"].shape == (2, 3, 5, 4, 4)
        for x in (batch["pixel_values"], batch["video_values"]):  # each item is one sample, whole
            assert torch.equal(x, x.flatten(1)[:, :1].reshape(-1, *[1] * (x.ndim - 1)).expand_as(x))
        expected = sum(i % 2 for i in ids(batch["pixel_values"]) + ids(batch["video_values"]))
        assert len(batch["skipped"]) == expected
        assert torch.equal(batch["pixel_values"], jb[index]["pixel_values"])
    only_images = JointBatches(images, None, 4, 0)
    batch = only_images[0]
    assert batch["video_values"] is None and batch["pixel_values"].shape == (4, 3, 4, 4) and len(only_images) == 3
    assert len(batch["skipped"]) == sum(i % 2 for i in ids(batch["pixel_values"]))
    only_videos = JointBatches(None, videos, 0, 3)
    assert only_videos[1]["pixel_values"] is None and only_videos[1]["video_values"].shape == (3, 3, 5, 4, 4)
    with pytest.raises(ValueError, match="without a dataset"):
        JointBatches(None, videos, 2, 2)
    with pytest.raises(ValueError, match="without a dataset"):
        JointBatches(images, None, 2, 2)


def test_joint_batches_visit_every_item_once_per_pass():
    images, videos = FakeDataset(12, (1, 1, 1)), FakeDataset(6, (1, 1, 1, 1))
    jb = JointBatches(images, videos, image_batch_size=3, video_batch_size=3, seed=5)
    orders = []
    for epoch in range(3):
        jb.epoch = epoch
        batches = [jb[i] for i in range(len(jb))]
        image_ids = [i for b in batches for i in ids(b["pixel_values"])]
        video_ids = [i for b in batches for i in ids(b["video_values"])]
        assert sorted(image_ids) == list(range(12))  # one pass over the images per epoch
        assert sorted(video_ids[:6]) == sorted(video_ids[6:]) == list(range(6))  # two passes over the videos
        assert video_ids[:6] != video_ids[6:]  # each pass reshuffled
        orders.append(image_ids)
    assert orders[0] != list(range(12))  # shuffled
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch


def test_joint_batches_deterministic_per_position():
    images, videos = FakeDataset(10, (1, 1, 1)), FakeDataset(7, (1, 1, 1, 1))

    def make(seed=1, epoch=0):
        jb = JointBatches(images, videos, image_batch_size=2, video_batch_size=2, seed=seed)
        jb.epoch = epoch
        return jb

    sequential = make(epoch=2)
    in_order = [sequential[i] for i in range(len(sequential))]
    for i in reversed(range(len(sequential))):  # a fresh object, any access order: the same batch
        b = make(epoch=2)[i]
        assert torch.equal(b["pixel_values"], in_order[i]["pixel_values"])
        assert torch.equal(b["video_values"], in_order[i]["video_values"])
    assert any(not torch.equal(make(epoch=3)[i]["pixel_values"], in_order[i]["pixel_values"]) for i in range(5))
    assert any(
        not torch.equal(make(seed=2, epoch=2)[i]["pixel_values"], in_order[i]["pixel_values"]) for i in range(5)
    )


def test_joint_batches_with_real_datasets(tmp_path):
    write_gif(tmp_path / "good.gif", index_frames(4))
    (tmp_path / "corrupt.gif").write_bytes(b"GIF89a broken")
    videos = VideoClips([str(tmp_path / "corrupt.gif"), str(tmp_path / "good.gif")], 16, 3)
    jb = JointBatches(EmbeddedPhotoCrops(16, names=("astronaut",), num_samples=4), videos, 2, 2)
    assert len(jb) == 2
    batch = jb[0]
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["video_values"].shape == (2, 3, 3, 16, 16)
    assert len(batch["skipped"]) == 1  # both videos are drawn once per pass; the corrupt one is skipped


def test_skip_log_counts_files_once_and_warns_once(caplog):
    log = SkipLog()
    with caplog.at_level("WARNING", logger="diffusability_hf.data"):
        for _ in range(3):  # 5 corrupt files met 3 times each (epochs, workers): 15 skip events
            log.update([(f"bad{i}.png", "OSError: truncated") for i in range(5)])
    assert len(log.files) == 5 and log.events == 15
    warned = [r.getMessage() for r in caplog.records if "Skipping unreadable file" in r.getMessage()]
    assert len(warned) == 5 and all(f"bad{i}.png" in " ".join(warned) for i in range(5))
    other = SkipLog()
    other.update([("bad0.png", "x"), ("elsewhere.png", "y")])
    merged = SkipLog().merge([log, other])
    assert merged.summary()["unreadable_files"] == 6 and merged.summary()["skip_events"] == 17
    assert merged.summary(limit=2)["unreadable_examples"] == ["bad0.png", "bad1.png"]


def test_hold_out_takes_readable_items_never_repeats_and_reports_what_it_examined():
    unreadable = {3, 7}

    def read(i):
        return None if i in unreadable else torch.full((2,), float(i))

    pixels, held, bad = hold_out(10, 4, read, seed=0)
    values = [int(v) for v in pixels[:, 0]]
    assert len(values) == 4 and len(set(values)) == 4 and not set(values) & unreadable
    assert set(values) <= set(held) and set(bad) == set(held) - set(values) and set(bad) <= unreadable
    again, held2, _ = hold_out(10, 4, read, seed=0)
    assert torch.equal(pixels, again) and held == held2  # seeded
    other, _, _ = hold_out(10, 4, read, seed=1)
    assert not torch.equal(pixels, other)
    everything, held_all, bad_all = hold_out(10, 20, read)  # asks for more than there is: no repeats
    assert len(everything) == 8 and held_all == list(range(10)) and bad_all == [3, 7]


def test_labelled_clips_classes_from_subfolders_random_starts_and_unreadable_videos(tmp_path, monkeypatch):
    """Class = subfolder; the clip start is drawn from (seed, index): fixed for a seed, different across seeds and
    within the video's range; an unreadable or too short video is ok=False (zeros), not a crash."""
    (tmp_path / "data" / "cats").mkdir(parents=True)
    write_gif(tmp_path / "data" / "cats" / "a.gif", index_frames(12))
    write_png_folder(tmp_path / "data" / "cats" / "frames", index_frames(12, offset=2))
    (tmp_path / "data" / "dogs").mkdir()
    write_gif(tmp_path / "data" / "dogs" / "short.gif", index_frames(3))
    (tmp_path / "data" / "dogs" / "corrupt.mp4").write_bytes(b"garbage" * 40)
    ds = LabelledClips(16, 4, video_data_dir=str(tmp_path / "data"), frame_stride=2, seed=0)
    assert ds.names == ["cats", "dogs"] and len(ds) == 4
    starts = {}
    for seed in range(6):
        ds = LabelledClips(16, 4, video_data_dir=str(tmp_path / "data"), frame_stride=2, seed=seed)
        clip, label, index, ok = ds[0]
        assert clip.shape == (3, 4, 16, 16) and (label, index, ok) == (0, 0, True)
        first = frame_indices(clip)
        assert first == [first[0] + 2 * t for t in range(4)] and 0 <= first[0] <= 12 - 7
        assert torch.equal(ds[0][0], clip)  # the same clip every time for a seed
        starts[seed] = first[0]
    assert len(set(starts.values())) > 1  # random starts across seeds
    for k in (2, 3):  # short.gif, corrupt.mp4 (sorted: corrupt.mp4 first)
        clip, label, _, ok = ds[k]
        assert (label, ok) == (1, False) and not clip.any()
    with pytest.raises(ValueError, match="has no subfolders"):
        LabelledClips(16, 4, video_data_dir=str(tmp_path / "data" / "cats" / "frames"))


def test_labelled_clips_embedded_pans_are_labelled_by_photograph():
    ds = LabelledClips(16, 3, embedded_samples=16, seed=1)
    assert ds.names[-1] == "animated GIF" and len(ds) == 16
    pans = EmbeddedPanClips(16, 3, num_samples=16, seed=1)
    for i in (0, 5, len(ds.names) - 1):
        clip, label, index, ok = ds[i]
        assert torch.equal(clip, pans[i]["pixel_values"]) and label == i % len(ds.names) and ok


def test_images_are_seen_as_they_should_be_16_bit_exif_and_upscaling(tmp_path, caplog):
    """A 16-bit PNG is scaled to 8 bits (PIL's RGB conversion clipped it to white), the EXIF orientation is applied
    (a phone photo stored sideways), and upscaling a small image is warned about once."""
    import logging
    import random

    import numpy as np
    from PIL import Image

    from diffusability_hf.data import images as data

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    pixels = data.open_and_crop(str(tmp_path / "g16.png"), 16)
    expected = torch.from_numpy((ramp / 257.0).round() / 127.5 - 1).float()
    assert torch.allclose(pixels[0], expected, atol=1e-6) and torch.equal(pixels[0], pixels[2])
    assert abs(float(pixels.mean())) < 0.02  # a grey ramp, not white

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: "rotate 90 CW to view"
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    seen = data.open_image(str(tmp_path / "phone.jpg"))
    assert seen.size == (20, 40)  # upright: portrait
    top, bottom = np.asarray(seen.convert("L"))[:20].mean(), np.asarray(seen.convert("L"))[20:].mean()
    assert top > 200 and bottom < 50  # the white half is on top once rotated clockwise

    data._warned_upscale.clear()
    with caplog.at_level(logging.WARNING, logger="diffusability_hf.data"):
        for _ in range(3):
            data.resize_and_crop(Image.new("RGB", (8, 12)), 16, True, False, random.Random(0))
        data.resize_and_crop(Image.new("RGB", (32, 32)), 16, True, False, random.Random(0))
    warned = [r for r in caplog.records if "smaller than --resolution 16" in r.getMessage()]
    assert len(warned) == 1 and "8x12" in warned[0].getMessage()

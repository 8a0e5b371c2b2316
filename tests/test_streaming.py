"""Streaming data (diffusability_hf.data.streaming): webdataset tar shards and HF streaming datasets, split across
processes, seeded shuffles, resume without repeats. Tiny shards of real photographs and videos built in tmp_path."""

import functools
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from diffusability_hf.data import shards as sh
from diffusability_hf.data import stream_items as si
from diffusability_hf.data import streaming as st
from diffusability_hf.data.images import HFImageDataset, SkipLog, collate, open_and_crop
from diffusability_hf.data.videos import VideoClips, embedded_gif_path
from diffusability_hf.errors import UsageError

R = 16  # resolution of the items


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def photo_crops(n: int):
    """``n`` different 24 x 32 crops of the astronaut photograph (uint8 RGB)."""
    image = skimage.data.astronaut()
    return [image[(37 * i) % 480 :][:24, (53 * i) % 470 :][:, :32].copy() for i in range(n)]


def write_tar(path, samples):
    """A webdataset shard: ``samples`` is ``[(key, {extension: bytes}), ...]``, members in that order."""
    with tarfile.open(path, "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def write_video(frames: int, fmt: str = "mp4", codec: str = "mpeg4", size=(40, 24)) -> bytes:
    """A small real video (moving gradient) written with PyAV."""
    import av

    buf, (w, h) = io.BytesIO(), size
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            x = np.linspace(0, 255, w)[None, :, None] + 20 * t
            frame = np.broadcast_to(x, (h, w, 3)).astype(np.uint8) % 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """4 shards x 6 samples; JPEG and PNG mixed; shard 2 sample 3 is corrupt, shard 1 sample 5 has no image."""
    root = tmp_path_factory.mktemp("shards")
    crops, paths, good = photo_crops(24), [], {}
    for s in range(4):
        samples = []
        for p in range(6):
            i = 6 * s + p
            fields = {"png" if i % 3 == 0 else "jpg": encode_image(crops[i], "PNG" if i % 3 == 0 else "JPEG")}
            fields["cls"] = str(i % 3).encode()
            if (s, p) == (2, 3):
                fields = {"jpg": b"\xff\xd8 not a JPEG", "cls": b"0"}
            elif (s, p) == (1, 5):
                fields = {"cls": b"1"}
            else:
                good[sh.sample_id(s, p)] = next(v for k, v in fields.items() if k != "cls")
            samples.append((f"photo/{s:02d}_{p:03d}", fields))
        paths.append(write_tar(root / f"{s:06d}.tar", samples))
    return root, paths, good


def ids_stream(source, **kw):
    """A ShardStream whose items are the sample ids (corrupt JPEGs raise as the image decode would)."""

    def decode(src, raw, where, sid, epoch):
        src.image_cell(raw, where)  # no image member -> raises
        if raw.get("jpg", b"").startswith(b"\xff\xd8 not"):
            raise ValueError("corrupt")
        return {"sid": sid, "skipped": []}

    return st.ShardStream(source, decode, **kw)


def epochs(stream, n: int = 1):
    """The sample ids of the stream's next ``n`` epochs (the rest of the current one first), one list each."""
    out, start = [[] for _ in range(n)], stream.epoch
    for item in stream:
        if stream.epoch - start == n:
            return out
        out[stream.epoch - start].append(item["sid"])


# ----------------------------------------------------------------------------------------------------------------
# Shard lists and errors


@pytest.mark.parametrize(
    "spec", ["s/{000..011}.tar", "{a,b}-{1..3}", "x{09..11}y", "{3..1}", "{a,{b,c}d}", "{x}{1..2}", "lit{}", "a{,b}"]
)
def test_expand_braces_matches_bash(spec):
    bash = subprocess.run(["bash", "-c", f"echo {spec}"], capture_output=True, text=True, check=True).stdout.split()
    assert sh.expand_braces(spec) == bash


def test_list_shards_folder_spec_and_errors(image_shards, tmp_path):
    root, paths, _ = image_shards
    assert sh.list_shards(train_data_dir=str(root)) == paths
    assert sh.list_shards(train_data_files=f"{root}/{{000001..000002}}.tar") == paths[1:3]
    assert sh.list_shards(train_data_files=[f"{root}/000003.tar", f"{root}/00000[01].tar"]) == [paths[3], *paths[:2]]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar archive" * 40)
    for kwargs, message in [
        ({"train_data_dir": str(tmp_path / "empty")}, "holds no tar shards"),
        ({"train_data_dir": str(tmp_path / "nowhere")}, "is not a folder"),
        ({"train_data_files": f"{root}/*.tgz"}, "matches no file"),
        ({"train_data_files": f"{root}/{{000003..000004}}.tar"}, "000004.tar does not exist"),
        ({"train_data_files": str(tmp_path / "bad.tar")}, "is not a readable tar archive"),
        ({}, "exactly one of"),
    ]:
        with pytest.raises(UsageError, match=message) as err:
            sh.list_shards(**kwargs)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Items: the map-style transforms, corrupt samples skipped and counted


def test_image_items_equal_map_style_and_skips_are_counted(image_shards):
    import datasets

    _, paths, good = image_shards
    stream = si.image_stream(sh.TarShards(paths), R, center_crop=True, shuffle=False)
    it = iter(stream)
    items = [next(it) for _ in range(len(good))]
    # The same image bytes through the map-style dataset (an HF column of undecoded images)
    cells = [{"bytes": b, "path": str(sid)} for sid, b in sorted(good.items())]
    hf = datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image(decode=False))
    reference = HFImageDataset(hf, "image", R, center_crop=True, random_flip=False)
    for i, item in enumerate(items):
        assert item["pixel_values"].shape == (3, R, R)
        assert torch.equal(item["pixel_values"], reference[i]["pixel_values"])
    log = SkipLog()
    log.update(collate(items)["skipped"])
    assert log.summary()["unreadable_files"] == 2 and log.events == 2
    assert sorted(log.files) == [f"{paths[1]}#photo/01_005", f"{paths[2]}#photo/02_003"]
    assert "no image member" in log.files[f"{paths[1]}#photo/01_005"]
    assert stream.epoch == 0 and stream.consumed == 24  # every sample handed out, the 2 skipped ones included


def test_truncated_shard_is_skipped_and_counted(image_shards, tmp_path):
    _, paths, _ = image_shards
    data = open(paths[0], "rb").read()
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as fh:
        fh.write(data[: len(data) // 2 + 100])  # cut inside a member
    source = sh.TarShards([cut, paths[1]])
    (out,) = epochs(ids_stream(source, shuffle=False))
    assert 0 < sum(sh.split_sample_id(s)[0] == 0 for s in out) < 6 and len([s for s in out if s >= 10**9]) == 5
    stream = si.image_stream(source, R, shuffle=False)
    skipped = [s for _, item in zip(range(20), stream) for s in item["skipped"]]
    assert any(where == cut and "ReadError" in why for where, why in skipped)


def test_video_items_equal_map_style(tmp_path):
    pytest.importorskip("av")
    mp4, webm = write_video(6), write_video(5, "webm", "libvpx")
    gif = open(embedded_gif_path(), "rb").read()
    short, corrupt = write_video(2), b"\x00\x00\x00\x18ftypmp42 truncated"
    videos = [("a", "mp4", mp4), ("b", "webm", webm), ("c", "mp4", corrupt), ("d", "gif", gif), ("e", "mp4", short)]
    shard = write_tar(tmp_path / "v.tar", [(k, {ext: data, "cls": b"2"}) for k, ext, data in videos])
    stream = si.clip_stream(
        sh.TarShards([shard]), R, num_frames=4, center_crop=True, random_start=False, shuffle=False
    )
    items = [item for _, item in zip(range(3), stream)]
    reference = VideoClips(
        [{"bytes": b, "path": k} for k, b in (("a", mp4), ("b", webm), ("d", gif))],
        R,
        4,
        center_crop=True,
        random_start=False,
    )
    for i, item in enumerate(items):
        assert item["pixel_values"].shape == (3, 4, R, R)
        assert torch.equal(item["pixel_values"], reference[i]["pixel_values"])
    assert [w for w, _ in items[2]["skipped"]] == [f"{shard}#c"]
    assert stream.consumed == 4
    nxt = next(iter(stream))  # the too-short video ends epoch 0; epoch 1 starts over
    assert any("fewer than" in why for _, why in nxt["skipped"]) and stream.epoch == 1
    labelled = list(si.labelled_items(sh.TarShards([shard]), [0], R, num_frames=4))
    assert [(tuple(x.shape), lab, ok) for x, lab, _, ok in labelled] == [((3, 4, R, R), 2, True)] * 2 + [
        ((3, 4, R, R), -1, False),
        ((3, 4, R, R), 2, True),
        ((3, 4, R, R), -1, False),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Split, shuffle, resume


class CountingShards(sh.TarShards):
    """TarShards that count how often each shard is opened."""

    def __init__(self, urls):
        super().__init__(urls)
        self.opened = []

    def iter_shard(self, shard, start=0):
        self.opened.append(shard)
        return super().iter_shard(shard, start)


@pytest.mark.parametrize("num_shards,world_size", [(4, 2), (3, 2), (1, 2), (2, 3)])
def test_processes_split_every_sample_exactly_once(image_shards, num_shards, world_size):
    _, paths, good = image_shards
    expected = sorted(s for s in good if sh.split_sample_id(s)[0] < num_shards)
    seen, opened = [], []
    for rank in range(world_size):
        source = CountingShards(paths[:num_shards])
        stream = ids_stream(source, seed=3, buffer_size=4, rank=rank, world_size=world_size)
        for item in stream:
            if stream.epoch == 1:
                break
            seen.append(item["sid"])
            before_next_epoch = list(source.opened)
        opened += before_next_epoch
    assert sorted(seen) == expected
    if num_shards >= world_size:  # by shard: each shard read by one process only
        assert sorted(opened) == list(range(num_shards))


def test_shuffle_is_seeded_and_differs_by_epoch(image_shards):
    _, paths, good = image_shards
    source = sh.TarShards(paths)
    epoch0, epoch1 = epochs(ids_stream(source, seed=1, buffer_size=5), 2)
    (again,) = epochs(ids_stream(source, seed=1, buffer_size=5))
    (other,) = epochs(ids_stream(source, seed=2, buffer_size=5))
    assert epoch0 == again and epoch0 != epoch1 and epoch0 != other
    assert sorted(epoch0) == sorted(epoch1) == sorted(good)
    assert ids_stream(source, seed=1).epoch_shards(0) != ids_stream(source, seed=1).epoch_shards(1)


@pytest.mark.parametrize("world_size", [1, 5])  # 5 > 4 shards: split by sample
@pytest.mark.parametrize("threads", [0, 2])
def test_resume_yields_exactly_the_rest(image_shards, world_size, threads):
    _, paths, _ = image_shards
    kw = dict(seed=7, buffer_size=6, rank=world_size - 1, world_size=world_size, decode_threads=threads)
    epoch0, epoch1 = epochs(ids_stream(sh.TarShards(paths), **kw), 2)
    for k in sorted({0, 1, len(epoch0) // 2, len(epoch0) - 2, len(epoch0)}):
        first = ids_stream(sh.TarShards(paths), **kw)
        it = iter(first)
        head = [next(it)["sid"] for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = ids_stream(CountingShards(paths), **kw)
        resumed.load_state_dict(state)
        rest, then = epochs(resumed, 2)
        assert head + rest == epoch0, k  # the rest of the epoch, in order, no repeats
        assert then == epoch1


def test_resume_reads_only_the_shards_still_needed(image_shards):
    _, paths, _ = image_shards
    for buffer_size, k in [(0, 13), (2, 18)]:
        first = ids_stream(sh.TarShards(paths), seed=1, buffer_size=buffer_size)
        it = iter(first)
        for _ in range(k):
            next(it)
        resumed = ids_stream(CountingShards(paths), seed=1, buffer_size=buffer_size)
        resumed.load_state_dict(first.state_dict())
        next(iter(resumed))
        order = resumed.epoch_shards(0)
        # No buffer: only the shard being read, from where it was; a buffer of 2: the shards of its 2 samples too
        assert order[0] not in resumed.source.opened and order[2] in resumed.source.opened
        if buffer_size == 0:
            assert resumed.source.opened == [order[2]]


def test_resume_through_a_dataloader_and_checkpoint_files(image_shards, tmp_path):
    _, paths, _ = image_shards
    make = lambda: si.image_stream(sh.TarShards(paths), R, random_flip=True, seed=5, buffer_size=5)  # noqa: E731
    batches = list(zip(range(8), torch.utils.data.DataLoader(make(), batch_size=4, collate_fn=collate)))
    stream = make()
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collate))
    for _ in range(3):
        next(loader)
    st.save_stream_state(stream, str(tmp_path))
    resumed = make()
    assert st.load_stream_state(resumed, str(tmp_path)) and resumed.consumed == stream.consumed
    for (_, expected), got in zip(batches[3:], torch.utils.data.DataLoader(resumed, batch_size=4, collate_fn=collate)):
        assert torch.equal(expected["pixel_values"], got["pixel_values"])  # same samples, same flips
    assert not st.load_stream_state(make(), str(tmp_path / "none"))


def test_resume_refuses_a_changed_stream(image_shards):
    _, paths, _ = image_shards
    state = ids_stream(sh.TarShards(paths), world_size=2).state_dict()
    state["consumed"] = 3
    with pytest.raises(UsageError, match="world_size 2 -> 1"):
        ids_stream(sh.TarShards(paths)).load_state_dict(state)
    loose = ids_stream(sh.TarShards(paths))
    loose.load_state_dict(state, strict=False)
    assert (loose.epoch, loose.consumed) == (1, 0)


def test_stream_refuses_dataloader_workers(image_shards, monkeypatch):
    _, paths, _ = image_shards
    stream = si.image_stream(sh.TarShards(paths), R)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    with pytest.raises(UsageError, match="num_workers=0"):
        next(iter(stream))


def test_hold_out_first_is_never_trained_on(image_shards):
    _, paths, good = image_shards
    source = sh.TarShards(paths)
    pixels, exclude, info = si.hold_out_first(source, 3, si.image_reader(R))
    assert pixels.shape == (3, 3, R, R) and exclude == [sh.sample_id(0, p) for p in range(3)]
    assert torch.equal(pixels[0], open_and_crop({"bytes": good[0], "path": "x"}, R))
    (out,) = epochs(ids_stream(source, exclude=exclude))
    assert sorted(out) == sorted(set(good) - set(exclude))


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def test_labelled_items_each_shard_once_with_stable_ids(image_shards, tmp_path):
    _, paths, good = image_shards
    seen = []
    for rank in range(3):
        shards = st.shards_for_rank(len(paths), rank, 3)
        loader = torch.utils.data.DataLoader(si.labelled_items(sh.TarShards(paths), shards, R), batch_size=4)
        for pixels, labels, ids, ok in loader:
            assert pixels.shape[1:] == (3, R, R)
            seen += [(int(i), int(lab), bool(o)) for i, lab, o in zip(ids, labels, ok)]
    assert sorted(i for i, _, _ in seen) == sorted(sh.sample_id(s, p) for s in range(4) for p in range(6))
    assert {i for i, _, o in seen if not o} == {sh.sample_id(2, 3), sh.sample_id(1, 5)}
    assert all(lab == (6 * (i // 10**9) + i % 10**9) % 3 for i, lab, o in seen if o)
    # Class names from txt / json labels
    shard = write_tar(
        tmp_path / "l.tar",
        [
            ("a", {"jpg": good[1], "txt": b"cat"}),
            ("b", {"jpg": good[1], "json": b'{"label": "dog"}'}),
            ("c", {"jpg": good[1]}),
        ],
    )
    items = list(si.labelled_items(sh.TarShards([shard], class_names=["dog", "cat"]), [0], R))
    assert [(lab, ok) for _, lab, _, ok in items] == [(1, True), (0, True), (-1, False)]
    assert torch.equal(items[0][0], open_and_crop({"bytes": good[1], "path": "x"}, R))


# ----------------------------------------------------------------------------------------------------------------
# Other sources: HF streaming datasets, http(s) and fsspec URLs


def test_hf_streaming_parquet(tmp_path):
    import datasets

    crops = photo_crops(9)
    files = []
    for s in range(3):
        cells = [{"bytes": encode_image(crops[3 * s + p], "PNG"), "path": f"{s}_{p}.png"} for p in range(3)]
        if s == 1:
            cells[2] = {"bytes": b"corrupt", "path": "1_2.png"}
        ds = datasets.Dataset.from_dict({"image": cells, "label": [p % 2 for p in range(3)]})
        ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["a", "b"]))
        ds.to_parquet(str(tmp_path / f"part-{s}.parquet"))
        files.append(str(tmp_path / f"part-{s}.parquet"))
    source = sh.load_streaming_dataset("parquet", data_files=files, label_column="label")
    assert source.num_shards == 3 and source.column == "image" and source.class_names == ["a", "b"]
    stream = si.image_stream(source, R, center_crop=True, shuffle=False)
    items = [item for _, item in zip(range(8), stream)]
    full = datasets.load_dataset("parquet", data_files=files, split="train").cast_column(
        "image", datasets.Image(decode=False)
    )
    reference = HFImageDataset(full.select([0, 1, 2, 3, 4, 6, 7, 8]), "image", R, True, False)
    assert all(torch.equal(a["pixel_values"], reference[i]["pixel_values"]) for i, a in enumerate(items))
    assert [w for it in items for w, _ in it["skipped"]] == ["1_2.png"]
    # Split, shuffle and resume as for tar shards
    a = ids_stream(source, seed=2, buffer_size=3, rank=1, world_size=2)
    it = iter(a)
    head = [next(it)["sid"] for _ in range(2)]
    b = ids_stream(source, seed=2, buffer_size=3, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    (rest,) = epochs(b)
    (full_epoch,) = epochs(ids_stream(source, seed=2, buffer_size=3, rank=1, world_size=2))
    assert head + rest == full_epoch
    labelled = list(si.labelled_items(source, [2], R))
    assert [(lab, ok) for _, lab, _, ok in labelled] == [(0, True), (1, True), (0, True)]


def test_http_and_fsspec_urls(image_shards):
    import fsspec

    root, paths, _ = image_shards
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = sh.list_shards(train_data_files=f"http://127.0.0.1:{server.server_port}/{{000000..000003}}.tar")
        (remote,) = epochs(ids_stream(sh.TarShards(urls), seed=4))
        with pytest.raises(UsageError, match="Cannot open the shard"):
            epochs(ids_stream(sh.TarShards([urls[0].replace("000000", "missing")])))
    finally:
        server.shutdown()
    (local,) = epochs(ids_stream(sh.TarShards(paths), seed=4))
    assert remote == local
    # Any fsspec filesystem (hf://, s3://, ...): listed and globbed through fsspec
    fs = fsspec.filesystem("memory")
    for p in paths:
        fs.pipe(f"/wds/{os.path.basename(p)}", open(p, "rb").read())
    urls = sh.list_shards(train_data_dir="memory://wds")
    assert [os.path.basename(u) for u in urls] == [os.path.basename(p) for p in paths]
    (memory,) = epochs(ids_stream(sh.TarShards(urls), seed=4))
    assert memory == local


def test_open_streaming_source_picks_the_reader(image_shards, tmp_path):
    root, paths, _ = image_shards
    assert sh.open_streaming_source(train_data_dir=str(root)).urls == paths
    assert sh.open_streaming_source(train_data_files=f"{root}/00000{{0,3}}.tar").urls == [paths[0], paths[3]]
    for p, crop in enumerate(photo_crops(4)):  # an image folder, classes as subfolders
        (tmp_path / "ab"[p % 2]).mkdir(exist_ok=True)
        Image.fromarray(crop).save(tmp_path / "ab"[p % 2] / f"{p}.png")
    source = sh.open_streaming_source(train_data_dir=str(tmp_path), label_column="label")
    assert isinstance(source, sh.HFShards) and source.class_names == ["a", "b"]
    items = list(si.labelled_items(source, range(source.num_shards), R))
    assert sorted(lab for _, lab, _, ok in items if ok) == [0, 0, 1, 1]
    with pytest.raises(UsageError, match="--streaming needs"):
        sh.open_streaming_source()

"""Run every script on tiny settings and print a fingerprint of what they wrote: for checking that a change of
structure leaves the outputs bit-identical.

    python utils/tiny_runs.py OUT_DIR > before.json     # on the old code
    python utils/tiny_runs.py OUT_DIR2 > after.json     # on the new code
    python utils/tiny_runs.py --compare before.json after.json

The runs: the bench's ``--smoke`` run (``train_ae_se``, ``extract_latents``, ``train_dit_flow``, ``eval_ae``,
``analyze_spectrum``, ``eval_dit`` and ``diffusability_score`` on the embedded autoencoder and images), then
``train_ae_se.py`` streaming from tar shards, and on the tiny LTX-Video config with the embedded clips. The
fingerprint holds the SHA-256 of every tensor of every safetensors file, of every numeric array of every NumPy
file, and of every JSON file's content less the keys that record times, speeds, memory, dates or file hashes and
with absolute paths blanked (they change from run to run and place to place).
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = re.compile(
    r"time|second|_s$|per_s|samples_s|date|dir|path|duration|elapsed|host|version|command|log|"
    r"memory|throughput|sha256|sha1|invocations",
    re.IGNORECASE,
)  # a file's sha256 covers its header, a stream's sha1 the shards' paths
CACHE_KEY = re.compile(r"-[0-9a-f]{20}(?=\.)")  # a cache file's key: a hash of the paths it was computed from


def run(args, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MPLBACKEND="Agg")
    with open(os.path.join(out, "log.txt"), "a") as log:
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env, stdout=log, stderr=log)


def write_shards(root, n_shards=3, per_shard=4, size=48):
    """Tar shards of PNG crops of one scikit-image photograph, labelled 0-2."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photo = data.astronaut()
    os.makedirs(root, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:06d}.tar"), "w") as tar:
            for p in range(per_shard):
                i = s * per_shard + p
                crop = photo[20 * i : 20 * i + size, 30 * i : 30 * i + size]
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"photo/{i:03d}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))


def run_all(out):
    os.makedirs(out, exist_ok=True)
    script = lambda name: os.path.join(ROOT, "train_scripts", name)  # noqa: E731
    run([script("diffusability_bench.py"), "--smoke", "--output_dir", os.path.join(out, "bench")], out)
    write_shards(os.path.join(out, "shards"))
    tiny = ["--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--lpips_weight", "0", "--report_to", "none", "--validation_steps", "100", "--num_validation_images", "2",
            "--latent_stats_num_samples", "8", "--seed", "0"]  # fmt: skip
    run([script("train_ae_se.py"), *tiny, "--resolution", "64", "--train_data_dir", os.path.join(out, "shards"),
         "--shuffle_buffer_size", "4", "--output_dir", os.path.join(out, "stream")], out)  # fmt: skip
    ltx = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs", "ltx.json")
    run([script("train_ae_se.py"), *tiny, "--resolution", "32", "--model_config_name_or_path", ltx, "--dct_block_size", "4",
         "--se_scale_factors", "2", "--num_frames", "9", "--image_batch_size", "1", "--video_batch_size", "1",
         "--num_validation_videos", "1", "--output_dir", os.path.join(out, "video")], out)  # fmt: skip


def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in sorted(value.items()) if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):  # where the run happened to be
        return re.sub(r"(?<![\w.])/[^\s'\",]+", "<path>", value)
    return value


def fingerprint(out):
    import torch
    from safetensors import safe_open

    prints = {}
    for folder, _, files in os.walk(out):
        for name in sorted(files):
            path = os.path.join(folder, name)
            key = CACHE_KEY.sub("-<key>", os.path.relpath(path, out))
            digest = hashlib.sha256()
            if name.endswith(".safetensors"):
                with safe_open(path, "pt") as f:
                    for tensor in sorted(f.keys()):
                        digest.update(
                            tensor.encode() + f.get_tensor(tensor).contiguous().view(torch.uint8).numpy().tobytes()
                        )
            elif name.endswith((".npy", ".npz")):
                import numpy as np

                arrays = np.load(path, allow_pickle=False)
                for array in [arrays] if name.endswith(".npy") else [arrays[k] for k in sorted(arrays.files)]:
                    if array.dtype.kind not in "USO":  # numbers, not the strings that name where they came from
                        digest.update(np.ascontiguousarray(array).tobytes())
            elif name.endswith(".json") and name != "times.json":  # times.json holds nothing but seconds
                try:
                    digest.update(json.dumps(scrub(json.load(open(path))), sort_keys=True).encode())
                except ValueError:
                    continue
            else:
                continue
            prints[key] = digest.hexdigest()[:20]
    return prints


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--fingerprint_only", action="store_true", help="Fingerprint OUT without running anything.")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
        only = sorted(a.keys() ^ b.keys())
        print(f"{len(a.keys() & b.keys())} files in both, {len(differ)} differ, {len(only)} in one only")
        for k in differ:
            print("differs:", k)
        for k in only:
            print("only in", "before:" if k in a else "after:", k)
        sys.exit(1 if differ or only else 0)
    if not args.fingerprint_only:
        run_all(args.out)
    json.dump(fingerprint(args.out), sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()

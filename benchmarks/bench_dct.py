"""Time the batched block DCT + frequency profile against a per-block ``scipy.fft.dctn`` loop.

    python benchmarks/bench_dct.py --repeats 5

Both compute the profile of ``diffusability_hf.spectral.frequency_profile`` (per signal: ratio of block-mean
amplitudes ``mean|D_uv| / mean|D_00|`` in zigzag order, averaged over signals); the script checks that they agree,
then prints the best-of-``repeats`` time of each and the speedup (target: >= 20x). ``frequency_profile`` runs
``blockwise_dct2d`` internally, so its time is the whole DCT + profile pipeline; the DCT alone is timed too.
No timing asserts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.fft import dctn

from diffusability_hf.spectral import blockwise_dct2d, frequency_profile, zigzag_order


def scipy_loop_profile(x: np.ndarray, block_size: int) -> np.ndarray:
    """Reference: one ``dctn`` call per ``B x B`` block, accumulating block-mean amplitudes per signal."""
    n, c, h, w = x.shape
    b = block_size
    nh, nw = h // b, w // b
    amp_sum = np.zeros((n, c, b, b), dtype=np.float64)
    for i in range(n):
        for j in range(c):
            for bi in range(nh):
                for bj in range(nw):
                    block = x[i, j, bi * b : (bi + 1) * b, bj * b : (bj + 1) * b]
                    amp_sum[i, j] += np.abs(dctn(block, norm="ortho"))
    amp = (amp_sum / (nh * nw)).reshape(n * c, b * b)[:, zigzag_order(b).numpy()]
    return (amp / np.maximum(amp[:, :1], 1e-8)).mean(axis=0)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method; the best is reported")
    parser.add_argument("--shape", type=int, nargs=4, default=(32, 16, 64, 64), metavar=("N", "C", "H", "W"))
    parser.add_argument("--block_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(*args.shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32)
    x = x + torch.linspace(-0.5, 0.5, args.shape[1]).reshape(1, -1, 1, 1)  # non-zero DC per channel
    x_np = x.numpy()
    n_blocks = x.numel() // args.block_size**2

    frequency_profile(x, args.block_size)  # warm-up (DCT matrix cache, allocator)
    ours = frequency_profile(x, args.block_size).double().numpy()
    ref = scipy_loop_profile(x_np, args.block_size)
    max_rel = float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)))
    agree = np.allclose(ours, ref, rtol=1e-4, atol=1e-6)

    t_dct = best_time(lambda: blockwise_dct2d(x, args.block_size), args.repeats)
    t_torch = best_time(lambda: frequency_profile(x, args.block_size), args.repeats)
    t_scipy = best_time(lambda: scipy_loop_profile(x_np, args.block_size), args.repeats)

    print(f"input {tuple(args.shape)} float32, block {args.block_size}: {n_blocks} blocks")
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (best time reported)")
    print(f"profiles agree: {agree} (max relative difference {max_rel:.2e})")
    print(f"blockwise_dct2d alone:                        {t_dct * 1e3:10.2f} ms")
    print(f"frequency_profile (block DCT + profile):      {t_torch * 1e3:10.2f} ms")
    print(f"scipy dctn per-block loop (same profile):     {t_scipy * 1e3:10.2f} ms")
    print(f"speedup, profile: {t_scipy / t_torch:.1f}x (target >= 20x); DCT alone vs loop: {t_scipy / t_dct:.1f}x")
    if not agree:
        raise SystemExit("the batched and the scipy profiles disagree")


if __name__ == "__main__":
    main()

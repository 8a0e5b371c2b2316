"""The SE fine-tuning presets: the paper's Table 5 per-AE settings, the CPU sizing of runs without a dataset, and the
one rule that layers them under the command line (``train_scripts/train_ae_se.py``)."""

import textwrap
from typing import Dict, Optional, Set

# Paper Table 5 (Appendix B). `kl_weight` is the "+FT" baseline's KL beta: SE runs turn KL off (Section 3.3). The
# batch sizes are global ("a batch size of 32 (320,000 total seen images)", Sec. 4): training.launch.split_global_batch() divides
# them over the processes and accumulation steps of the launch.
SE_PRESETS = {
    "flux": dict(learning_rate=1e-5, train_batch_size=32, max_train_steps=10_000, kl_weight=1e-3, mse_weight=1.0,
                 lpips_weight=1.0, max_grad_norm=50.0, num_frozen_up_blocks=1, resolution=256),
    "cosmos": dict(learning_rate=1e-4, train_batch_size=32, max_train_steps=10_000, kl_weight=0.0, mse_weight=1.0,
                   lpips_weight=1.0, max_grad_norm=50.0, num_frozen_up_blocks=3, resolution=256),
    "cogvideox": dict(learning_rate=3e-4, train_batch_size=64, video_batch_size=32, max_train_steps=20_000,
                      kl_weight=1e-3, mse_weight=1.0, lpips_weight=1.0, max_grad_norm=1.0, num_frozen_up_blocks=0,
                      resolution=256, num_frames=17),
    "ltx": dict(learning_rate=5e-5, train_batch_size=64, video_batch_size=32, max_train_steps=20_000, kl_weight=1e-4,
                mse_weight=5.0, lpips_weight=1.0, max_grad_norm=50.0, num_frozen_up_blocks=0, resolution=256,
                num_frames=17),
}  # fmt: skip

# Without a dataset the run is sized for a few CPU minutes, whatever the preset. LPIPS is off: its trunk is a download.
SE_EMBEDDED_SIZING = {
    # the embedded AE on the embedded photographs (the no-argument run)
    "embedded AE": dict(learning_rate=2e-4, train_batch_size=16, max_train_steps=300, lpips_weight=0.0, resolution=64,
                        validation_steps=100, checkpointing_steps=300, num_frozen_up_blocks=0),
    # a video AE (e.g. diffusability_hf/assets/tiny_configs/cogvideox.json) on embedded crops and camera pans
    "video AE": dict(train_batch_size=4, video_batch_size=2, max_train_steps=100, lpips_weight=0.0, resolution=64,
                     validation_steps=50, checkpointing_steps=100),
    "other AEs": dict(resolution=64),  # the embedded photographs' crops
}  # fmt: skip


BATCH_FLAGS = ("train_batch_size", "video_batch_size")


def settings_epilog() -> str:
    """The --help epilog of train_ae_se.py: the rule, the presets and the no-dataset sizing, from the tables above."""
    rows = [(f"--preset {name}", values) for name, values in SE_PRESETS.items()]
    rows += [(f"no dataset, {kind}", values) for kind, values in SE_EMBEDDED_SIZING.items()]
    lines = textwrap.wrap(
        "Settings: a flag given on the command line wins; else, with no --dataset_name / --train_data_dir, the CPU "
        "sizing below (for a video AE: with no video data either); else --preset; else the defaults above. With SE "
        "on (--se_weight > 0), a preset's kl_weight is not used (Section 3.3).",
        width=100,
    )
    for label, values in rows:
        text = f"{label}: " + " ".join(f"{k}={v}" for k, v in values.items())
        lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def se_preset_settings(
    preset: Optional[str],
    se_weight: float,
    given: Set[str],
    embedded_model: bool,
    embedded_data: bool,
    embedded_video: bool,
    video_ae: bool,
) -> Dict:
    """The one rule for settings: a flag on the command line (``given``, by ``dest``) > the no-dataset CPU sizing >
    ``preset`` > argparse's default. Returns the values for the flags that were not given, and
    ``preset_global_batch``: the batch sizes that are the preset's Table 5 global ones (split over the processes by
    :func:`~diffusability_hf.training.launch.split_global_batch`)."""
    table5 = dict(SE_PRESETS.get(preset, {}))
    if se_weight > 0:
        table5.pop("kl_weight", None)  # SE runs turn KL off (Section 3.3)
    sizing = {}
    if embedded_data:
        kind = "embedded AE" if embedded_model else "video AE" if video_ae and embedded_video else "other AEs"
        sizing = SE_EMBEDDED_SIZING[kind]
    values = {k: v for k, v in {**table5, **sizing}.items() if k not in given}
    values["preset_global_batch"] = {k: table5[k] for k in BATCH_FLAGS if k in values and k not in sizing}
    return values

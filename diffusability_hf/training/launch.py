"""Setting a training run up: launcher checks (``check_launcher``, ``refuse_hub_token``), the accelerator
(``make_accelerator``, ``configure_deepspeed``), stop signals (``GracefulStop``), tracker settings and the global
batch a preset gives (``split_global_batch``, ``describe_global_batch``).
"""

import json
import logging
import os
from typing import Dict, Mapping, Optional

from ..errors import TrainingStopped, UsageError

logger = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a training DataLoader: its worker processes ignore SIGTERM and Ctrl-C, so that a signal
    sent to the whole job (a scheduler's SIGTERM, Ctrl-C in a terminal) reaches the training process alone, which
    stops after its step with a checkpoint (:class:`GracefulStop`) and then shuts its workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class GracefulStop:
    """SIGTERM (what a cluster scheduler sends before preemption) and the first Ctrl-C (SIGINT) ask the training loop
    to stop after the current step, with a checkpoint; a second Ctrl-C stops at once (``KeyboardInterrupt``). A
    repeated SIGTERM changes nothing: a scheduler signals every process of a job and ``torchrun`` (under ``accelerate
    launch`` too) forwards the same signal to its workers, so each worker may get it twice; SIGKILL, as schedulers and
    ``torchrun`` send after their grace period, still ends the process. The handlers only set a flag: the step, a
    checkpoint being written or a validation in progress finish first. Installed on construction (main thread only),
    restored by :meth:`close`."""

    def __init__(self):
        import signal

        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the default behaviour stays
                pass

    def _handle(self, signum, frame):
        import signal

        if self.signum is None:
            self.signum = signum
            logger.warning(
                f"Received {signal.Signals(signum).name}: stopping after this step with a checkpoint"
                + (" (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
            )
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts at once
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        # a repeated SIGTERM (the scheduler's and the launcher's copy of one request): already stopping

    def requested(self, accelerator) -> bool:
        """Whether any process was asked to stop (a collective under several processes: call it on every one, at the
        same point of the loop)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        import torch

        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=accelerator.device)
        value = int(accelerator.reduce(flag, "sum").item())
        if value and self.signum is None:
            self.signum = value  # another process's signal (the same one on every process, as a launcher sends it)
        return value != 0

    def stopped(self, step: int, checkpoint: str) -> TrainingStopped:
        """The exception to raise once the checkpoint of ``step`` is saved."""
        import signal

        names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
        name = names.get(self.signum, f"signal {self.signum}")
        signum = self.signum if self.signum in names else signal.SIGTERM
        return TrainingStopped(
            f"Stopped by {name} after step {step}, with {checkpoint}: continue with --resume_from_checkpoint latest "
            "and the same arguments.",
            signum,
        )

    def close(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ----------------------------------------------------------------------------------------------------------------
# Training loops: what both training scripts do the same way


def check_launcher(compile: bool = False, mixed_precision: Optional[str] = None) -> None:
    """Refuse a launch the scripts cannot run (FSDP1, ``--compile`` under FSDP: :func:`~.fsdp.check_fsdp_launch`;
    DeepSpeed with bf16 or fp16), before any weights load. ``mixed_precision``: the script's ``--mixed_precision``
    (it overrides the config's ``mixed_precision``, which ``accelerate launch`` exports as
    ``ACCELERATE_MIXED_PRECISION``)."""
    from .fsdp import FSDPLaunchError, check_fsdp_launch

    try:
        check_fsdp_launch(compile)
    except FSDPLaunchError as err:
        raise UsageError(str(err)) from None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    # DeepSpeed's bf16/fp16 casts the whole prepared module (the frozen AE, LPIPS) to that dtype and autocasts
    # nothing, while the scripts keep fp32 weights and inputs under autocast: the first matmul fails on dtypes
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if precision == "no" and config_file != "none" and os.path.isfile(config_file):
        with open(config_file) as fh:
            ds_config = json.load(fh)
        precision = next((k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled") is True), "no")
    if precision != "no":
        raise UsageError(
            f"DeepSpeed with {precision} is not supported (DeepSpeed casts the whole model, frozen parts included, to "
            f"{precision}, unlike the scripts' fp32 weights under autocast): for {precision}, launch with "
            "accelerate_configs/fsdp.yaml (FSDP2) or multi_gpu.yaml (DDP); or set `mixed_precision: no` in the "
            "DeepSpeed config (and leave out --mixed_precision)."
        )


def configure_deepspeed(accelerator, micro_batch_size: Optional[int], max_grad_norm: float) -> None:
    """Under DeepSpeed, give the engine the script's flags before ``accelerator.prepare``: ``--max_grad_norm``
    (accelerate would fill the config's ``gradient_clipping: auto`` with 1.0, and the engine clips inside
    ``accelerator.backward``, so ``clip_grad_norm_`` only reads the norm) and, when given, the per-process batch
    (``prepare`` without a dataloader, as for streamed data, cannot infer it; a preset's per-process batch is known
    only after the split over the processes, so the script passes it then). A config that sets another
    ``gradient_clipping`` is refused."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(clipping) != float(max_grad_norm):
        raise UsageError(
            f"The DeepSpeed config clips gradients at {clipping} and --max_grad_norm is {max_grad_norm}: remove "
            "`gradient_clipping` from the config (the script's --max_grad_norm is used), or pass the same value."
        )
    if micro_batch_size is not None and config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size


def make_accelerator(args):
    """The ``Accelerator`` of a training script (accumulation, precision, trackers under ``output_dir/logging_dir``,
    a seedable sampler so that a resumed run sees the batches a straight one does, under DeepSpeed the clipping and
    batch of the flags: :func:`configure_deepspeed`), with logging configured."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    configure_deepspeed(accelerator, None, args.max_grad_norm)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return accelerator


def tracker_config(args) -> dict:
    """The run's settings (the parsed ``args``, or a dict of them) for ``accelerator.init_trackers``: scalars as they
    are, lists of scalars joined by spaces, the rest (and ``hub_token``) left out."""
    config = {}
    for key, value in (args if isinstance(args, dict) else vars(args)).items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            value = " ".join(map(str, value))
        if key != "hub_token" and isinstance(value, (int, float, str, bool)):
            config[key] = value
    return config


def given_flags(parser, input_args, args) -> set:
    """The settings named on the command line (by ``dest``): ``input_args`` parsed again into a namespace that already
    holds a marker for every setting of ``args``, which argparse's defaults then leave alone."""
    import argparse

    unset = object()
    probe = parser.parse_args(input_args, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {dest for dest, value in vars(probe).items() if value is not unset}


# What a batch flag counts, for messages
BATCH_UNITS = {"train_batch_size": "images", "video_batch_size": "clips"}


def split_global_batch(
    global_sizes: Mapping[str, int], num_processes: int, accumulation: int, preset: str
) -> Dict[str, int]:
    """Per-process batch sizes that give a preset's global batch with this launch (the paper's Table 5 sizes are
    global: "a batch size of 32 (320,000 total seen images)", Sec. 4).

    ``global = per_process x num_processes x accumulation``. ``global_sizes`` maps a batch flag's ``dest`` (e.g.
    ``train_batch_size``) to the preset's global size. Returns ``{dest: per-process size}``; raises a
    :class:`UsageError` naming the process counts that divide it and the nearest per-process flags when this launch
    does not.
    """
    split = {}
    for key, total in global_sizes.items():
        if total == 0:
            split[key] = 0
            continue
        share = num_processes * accumulation
        if total % share:
            flag, what = "--" + key, BATCH_UNITS.get(key, "samples")
            near = sorted({max(1, total // share), total // share + 1})
            options = " or ".join(f"{flag} {n} ({n * share} {what} per step)" for n in near)
            counts = [n for n in range(1, total + 1) if total % (n * accumulation) == 0]
            raise UsageError(
                f"--preset {preset} trains with the paper's global batch of {total} {what} per step (Table 5), "
                f"which {num_processes} processes x {accumulation} accumulation steps do not divide: launch with "
                f"{', '.join(map(str, counts))} processes, or give the per-process batch yourself: {options}."
            )
        split[key] = total // share
    return split


def describe_global_batch(
    per_process: Mapping[str, int],
    num_processes: int,
    accumulation: int,
    preset: Optional[str] = None,
    num_frames: Optional[int] = None,
) -> dict:
    """What one optimizer step sees in total, for the log, ``metrics.json`` and the model card.

    ``per_process`` maps a unit ("images", "clips", "latents") to its per-process micro-batch; ``preset`` names the
    preset whose global batch it is (None: per-process flags); ``num_frames`` is said of clips. Returns the totals per
    unit, ``per_process``, ``num_processes``, ``gradient_accumulation_steps``, ``source`` and ``description``.
    """
    share = num_processes * accumulation
    totals = {unit: n * share for unit, n in per_process.items()}
    frames = f" of {num_frames} frames" if num_frames else ""
    text = " + ".join(f"{n} {unit}" + (frames if unit == "clips" else "") for unit, n in totals.items())
    text += f" ({' + '.join(map(str, per_process.values()))} per process x {num_processes} processes x "
    text += f"{accumulation} accumulation steps" + (f"; --preset {preset}'s Table 5 global batch)" if preset else ")")
    return {
        **totals,
        "per_process": dict(per_process),
        "num_processes": num_processes,
        "gradient_accumulation_steps": accumulation,
        "source": f"--preset {preset} (Table 5, global)" if preset else "per-process flags",
        "description": text,
    }

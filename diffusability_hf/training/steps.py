"""The training step's helpers: the autoencoder's optimizer (``ae_adamw``), the optimizer step both scripts take
(``optimizer_step``), per-step seeding (``step_generator``), the learning rate on resume, peak memory, throughput
(``StepMeter``) and the guard against non-finite losses (``NonFiniteGuard``).
"""

import logging
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import UsageError

logger = logging.getLogger(__name__)


def deepspeed_active(accelerator) -> bool:
    """True when ``accelerator.prepare`` hands the model to a DeepSpeed engine."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def ae_adamw(
    params, lr: float, betas: Tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.01, eps: float = 1e-8
) -> torch.optim.AdamW:
    """train_ae_se.py's optimizer: AdamW with App. B's betas (0.9, 0.99) and weight decay 0.01. Scalar parameters
    (e.g. LTX's ``timestep_scale_multiplier``, initialised to 1000) are multipliers: no decay (our choice)."""
    decay = [p for p in params if p.ndim > 0]
    no_decay = [p for p in params if p.ndim == 0]
    return torch.optim.AdamW(
        [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else []),
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        eps=eps,
    )


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The seed of one micro-batch: a function of (``--seed``, optimizer step, process, micro-batch) only, so that a
    resumed run draws what a straight one does and no two processes or accumulation steps share noise."""
    return seed * 1_000_003 + step * 64 + rank + micro * 7_919_000_003


def step_generator(device, seed: int, step: int, rank: int, micro: int):
    """A ``torch.Generator`` on ``device`` seeded with :func:`step_seed`; torch's global RNG (dropout, decoder noise
    injection) is seeded from the same value, offset so that the two streams differ."""
    import torch

    value = step_seed(seed, step, rank, micro)
    torch.manual_seed(value + 12_345)
    return torch.Generator(device).manual_seed(value)


def use_learning_rate(lr_scheduler, learning_rate: float, log: Callable[[str], None]) -> None:
    """After a resume, the learning rate of the command line, not the checkpoint's: the saved ``LambdaLR`` state
    restores its ``base_lrs``, so a run resumed with a lower ``--learning_rate`` (what a diverged run is told to
    do) would otherwise go on with the old one. Logs the change; nothing when they agree."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    old = list(sched.base_lrs)
    if all(math.isclose(b, learning_rate, rel_tol=1e-9) for b in old):
        return
    sched.base_lrs = [learning_rate for _ in old]
    for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(sched.last_epoch)
    log(f"--learning_rate {learning_rate:g} replaces the checkpoint's {old[0]:g} from here on")


def peak_memory_gb(device) -> float:
    """Peak accelerator memory allocated by tensors (CUDA), else the process's peak resident memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: unlike ru_maxrss, it does not start from the launcher's peak (kept across fork and exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StepMeter:
    """Throughput of a training loop, per optimizer step and over the run: global samples/s, step time, the time
    spent waiting on the data loader, and peak memory (``peak_memory_gb``), so that a run can be compared with
    published per-GPU figures.

    Wrap the loader (``for batch in meter.batches(loader)``: the time spent in its ``next`` is the data wait), call
    :meth:`step` right after each optimizer step (its scalars go to the progress bar and the trackers) and
    :meth:`restart` once the step's logging, checkpointing and validation are done, so that their time is not
    counted as training. A step's time runs from the previous :meth:`restart` (or construction) to :meth:`step`:
    data wait, forward, backward and optimizer, over every micro-batch of gradient accumulation. On CUDA, :meth:`step`
    synchronises the device first (kernels are asynchronous).
    """

    def __init__(self, samples_per_step: int, device, warmup_steps: int = 1):
        import time

        self._clock = time.perf_counter
        self.samples_per_step, self.device, self.warmup_steps = int(samples_per_step), device, warmup_steps
        self.times: List[Tuple[float, float]] = []  # (step time, data wait) per step, in seconds
        self.restart()

    def restart(self) -> None:
        """Start timing the next step (after logging, checkpoints and validation)."""
        self._start, self._wait = self._clock(), 0.0

    def batches(self, iterable):
        """The items of ``iterable``, with the time spent waiting for each added to the current step's data wait."""
        iterator = iter(iterable)
        while True:
            start = self._clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._wait += self._clock() - start
            yield item

    def step(self) -> Dict[str, float]:
        """Close the current optimizer step; its figures as tracker scalars (``train/...``)."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        seconds = max(self._clock() - self._start, 1e-9)
        self.times.append((seconds, self._wait))
        return {
            "train/samples_per_second": self.samples_per_step / seconds,
            "train/step_time_s": seconds,
            "train/data_wait_s": self._wait,
            "train/peak_memory_gb": peak_memory_gb(self.device),
        }

    def summary(self) -> Dict[str, object]:
        """Over the steps after the first ``warmup_steps`` (graph compilation, allocator and cache warm-up; all the
        steps when there are no more): global samples/s (samples over the summed step times), the median step time,
        the share of step time spent waiting on data, the first step's time, and the peak memory."""
        kept = self.times[self.warmup_steps :] or self.times
        total = sum(t for t, _ in kept)
        import statistics

        return {
            "samples_per_step": self.samples_per_step,
            "steps_measured": len(kept),
            "samples_per_second": self.samples_per_step * len(kept) / total if total else None,
            "median_step_time_s": statistics.median(t for t, _ in kept) if kept else None,
            "data_wait_fraction": sum(w for _, w in kept) / total if total else None,
            "first_step_time_s": self.times[0][0] if self.times else None,
            "peak_memory_gb": peak_memory_gb(self.device),
        }


class NonFiniteLossError(UsageError):
    """Too many optimizer steps in a row had a non-finite loss; the run stopped with a checkpoint."""


class NonFiniteGuard:
    """Skip the updates of a non-finite loss, count them, and stop a run that keeps diverging.

    ``finite(loss)`` is asked once per micro-batch: it is ``True`` only when the loss is finite on *every* process
    (the flag is reduced, so all processes skip together and no collective is left waiting). A step with a
    non-finite micro-batch skips the backward of that micro-batch and the optimizer and EMA updates of the whole
    step (the gradients are dropped), but still counts as a step: the data, the per-step seeds and the learning-rate
    schedule move on. Under DeepSpeed the engine steps inside the backward, which a skipped backward skips; with
    gradient accumulation a non-finite micro-batch stops the run (the engine keeps the step's earlier gradients). After ``max_in_a_row`` such steps in a row, :meth:`step_done` raises
    :class:`NonFiniteLossError` (the caller saves a checkpoint first).
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.skipped, self.in_a_row, self._bad = max_in_a_row, 0, 0, False
        self._saved = None

    def remember(self, parameters, optimizer, ema=None, accelerator=None) -> None:
        """Keep a copy of what the coming optimizer step changes (the trainable weights, the optimizer's state, the
        EMA), so that a run that diverges stops with the weights of its last finite loss (:meth:`restore`): the
        step before a run of non-finite losses is usually the one that blew the weights up. Costs one more copy of
        those on their device (under FSDP of this process's shards); nothing with ``max_in_a_row = 0`` or under
        DeepSpeed, whose engine keeps its own partitioned optimizer state. Call it right before ``optimizer.step()``
        of a step that is not skipped."""
        import torch

        if not self.max_in_a_row or (accelerator is not None and deepspeed_active(accelerator)):
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        with torch.no_grad():
            if self._saved is None:
                weights = [(p, p.detach().clone()) for p in parameters]
                self._saved = {"weights": weights, "state": {}, "ema": None}
            for p, buffer in self._saved["weights"]:
                buffer.copy_(p.detach())
            old, state = self._saved["state"], {}
            for p, entries in inner.state.items():  # AdamW: step, exp_avg, exp_avg_sq (created at the first step)
                state[p] = {}
                for key, value in entries.items():
                    if torch.is_tensor(value):
                        buffer = old.get(p, {}).get(key)
                        if buffer is None or buffer.shape != value.shape:
                            buffer = value.detach().clone()
                        else:
                            buffer.copy_(value)
                        state[p][key] = buffer
                    else:
                        state[p][key] = value
            self._saved.update(state=state, inner=inner)
            if ema is not None:
                shadow = self._saved["ema"][0] if self._saved["ema"] else [s.clone() for s in ema.shadow]
                for buffer, s in zip(shadow, ema.shadow):
                    buffer.copy_(s)
                self._saved["ema"] = (shadow, ema.num_updates, ema)

    def restore(self) -> bool:
        """Put back what :meth:`remember` kept (weights, optimizer state, EMA); ``False`` when nothing was kept."""
        import torch

        if self._saved is None:
            return False
        with torch.no_grad():
            for p, buffer in self._saved["weights"]:
                p.copy_(buffer)
            inner, state = self._saved.get("inner"), self._saved["state"]
            if inner is not None:
                for p in list(inner.state):
                    if p not in state:
                        del inner.state[p]  # had no state before that step: AdamW starts it afresh
                        continue
                    for key, value in state[p].items():
                        if torch.is_tensor(value):
                            inner.state[p][key].copy_(value)
                        else:
                            inner.state[p][key] = value
            if self._saved["ema"] is not None:
                shadow, updates, ema = self._saved["ema"]
                for s, buffer in zip(ema.shadow, shadow):
                    s.copy_(buffer)
                ema.num_updates = updates
        return True

    def finite(self, loss, accelerator) -> bool:
        import torch

        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        bad = bool(accelerator.reduce(bad, "sum").item() > 0) if accelerator.num_processes > 1 else bool(bad.item())
        if bad and accelerator.gradient_accumulation_steps > 1 and deepspeed_active(accelerator):
            # The ZeRO optimizer keeps the step's earlier micro-batch gradients, and its zero_grad leaves them
            raise NonFiniteLossError(
                "The loss was not finite, and under DeepSpeed with gradient accumulation the step cannot be skipped "
                "(DeepSpeed keeps its earlier micro-batches' gradients): resume with --resume_from_checkpoint "
                "latest after lowering --learning_rate or checking the data, or train with "
                "--gradient_accumulation_steps 1, or launch with accelerate_configs/multi_gpu.yaml or fsdp.yaml."
            )
        self._bad = self._bad or bad
        return not bad

    @property
    def step_is_bad(self) -> bool:
        """Whether a micro-batch of the current step had a non-finite loss (its updates are skipped)."""
        return self._bad

    def step_done(self, step: int) -> bool:
        """Close optimizer step ``step``; returns whether it was skipped, and raises after too many in a row."""
        skipped, self._bad = self._bad, False
        self.skipped += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped and self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"The loss was not finite for {self.in_a_row} optimizer steps in a row (up to step {step}; "
                f"{self.skipped} skipped in all), so training stopped with a checkpoint of the weights of the last "
                "finite loss (before the step that diverged): lower --learning_rate or --max_grad_norm, train in bf16 "
                "or fp32 instead of fp16, check the data for NaN or inf values, then resume with "
                "--resume_from_checkpoint latest and the new flags (or raise --max_nonfinite_steps)."
            )
        return skipped


def optimizer_step(
    loss: torch.Tensor,
    accelerator,
    model,
    optimizer,
    lr_scheduler,
    max_grad_norm: float,
    guard: Optional["NonFiniteGuard"] = None,
    trainable=None,
    ema=None,
) -> Optional[torch.Tensor]:
    """One optimizer step as both training scripts take it, inside ``accelerator.accumulate(model)``: the backward
    of a finite loss; unless the step had a non-finite loss (``guard``), clipping on sync steps
    (``max_grad_norm > 0``), what the step will change remembered for a run that diverges here (``trainable``, the
    optimizer and ``ema``, see :meth:`NonFiniteGuard.remember`) and the optimizer step; then the schedule, and the
    gradients dropped (a skipped step's too). Returns the gradient norm, None where nothing was clipped. The
    benchmarks time this function, so they time the step the scripts run."""
    if guard is None or guard.finite(loss, accelerator):
        accelerator.backward(loss)
    grad_norm = None
    if guard is None or not guard.step_is_bad:
        if accelerator.sync_gradients and max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if guard is not None and accelerator.sync_gradients:  # what this step changes, for a run that diverges here
            guard.remember(trainable, optimizer, ema, accelerator)
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
    return grad_norm

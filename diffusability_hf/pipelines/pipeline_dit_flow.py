# Class-conditional latent DiT sampling with rectified flow ("Improving the Diffusability of Autoencoders",
# Skorokhodov et al., 2025, Section 4 and Appendix B).
#
# `DiTFlowMatchPipeline` samples images, `DiTFlowMatchVideoPipeline` (the same sampling loop on (B, C, T', h, w)
# latents, decoded by a video autoencoder) class-conditional videos.
#
# This file is self-contained on purpose: `DiTFlowMatchPipeline.save_pretrained` copies it to `pipeline.py` at the
# root of the saved folder, so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the
# pipeline (either class, named in model_index.json) without the toolkit installed. Import only torch, numpy, PIL,
# the standard library and diffusers here.

import contextlib
import importlib
import inspect
import json
import numbers
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput, logging
from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

logger = logging.get_logger(__name__)

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_COMPONENTS = ("transformer", "vae", "scheduler")
# Libraries whose classes model_index.json names as ["<library>", "<ClassName>"] and that loaders import themselves.
_KNOWN_LIBRARIES = ("diffusers", "transformers")


class DiTFlowMatchPipeline(DiffusionPipeline):
    r"""
    Class-conditional image generation with a latent DiT trained by rectified flow (flow matching), sampled with
    `FlowMatchEulerDiscreteScheduler`, optional classifier-free guidance, the paper's time shift (eq. 3) and
    self-conditioning, optionally only inside a noise interval (`guidance_interval`). A diffusers-style
    `callback_on_step_end` sees the latents after every step and the model's prediction of the clean latent
    (`x0_pred`), which is what the paper's Fig. 6 decodes along one denoising trajectory.

    The transformer predicts the velocity `v = noise - x0` for `x_t = (1 - sigma) x0 + sigma noise`, with the
    timestep on the DiT's 0..1000 scale (`sigma * 1000`). Latents are sampled in the normalised space the transformer
    was trained in and mapped back with `z = x * latents_std + latents_mean` before the autoencoder decodes them.

    Args:
        transformer ([`ModelMixin`]):
            A class-conditional velocity model called as `transformer(hidden_states, timestep, class_labels)`:
            diffusers' `DiTTransformer2DModel`, or a custom `ModelMixin` with the same call. A custom model whose
            config has `self_conditioning=True` also takes `self_cond` and returns `last_hidden_state`.
        vae ([`ModelMixin`]):
            The autoencoder whose latents the transformer was trained on (`AutoencoderKL`, `AutoencoderDC`,
            `AutoencoderKLQwenImage`, ...). Video autoencoders (3D convolutions) decode images as 1-frame videos.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            The Euler flow-matching scheduler; its `shift` is set per call.
        id2label (`dict[str, str]`, *optional*):
            Class id (as a string) -> class name, for calling the pipeline with names.
        latents_mean (`list[float]`, *optional*):
            Per-channel mean the training latents were normalised with (defaults to 0); or per-position statistics,
            nested lists of the latent shape `(C, h, w)` (the latents extraction's `--per_position_statistics`).
        latents_std (`list[float]`, *optional*):
            Per-channel (or per-position, as `latents_mean`) standard deviation the training latents were normalised
            with (defaults to 1).
        provenance (`dict`, *optional*):
            Where the transformer's training latents came from, saved in `model_index.json` (readable with `json`
            alone). The toolkit's training script records `latents_ae_weights_fingerprint` (the weights of the
            autoencoder that encoded the training latents), `vae_weights_fingerprint` (the weights of this
            pipeline's `vae`), `latents_ae` (its name or path), `latents` (the latents folder, or the images encoded
            on the fly) and `fingerprint_function`; a consumer recomputes the `vae` fingerprint with that function
            and refuses a mismatch.
    """

    model_cpu_offload_seq = "transformer->vae"
    # What `callback_on_step_end` can ask for: the latents after the scheduler step, and the prediction of the clean
    # latent at this step, `x0_pred = x_t - sigma * v` (guided velocity, normalised latent space, before the step)
    _callback_tensor_inputs = ["latents", "x0_pred"]

    def __init__(
        self,
        transformer: ModelMixin,
        vae: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler,
        id2label: dict[str, str] | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        provenance: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        # JSON turns int keys into strings: store them as strings from the start so that both spellings agree.
        id2label = {str(int(k)): str(v) for k, v in id2label.items()} if id2label else None
        latents_mean = _floats(latents_mean) if latents_mean is not None else None  # nested: per position
        latents_std = _floats(latents_std) if latents_std is not None else None
        provenance = json.loads(json.dumps(provenance)) if provenance else None  # plain JSON values, as saved
        self.register_to_config(
            id2label=id2label, latents_mean=latents_mean, latents_std=latents_std, provenance=provenance
        )
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # ----------------------------------------------------------------------------------------------------- labels

    @property
    def num_classes(self) -> int:
        """Number of classes of the transformer; the id `num_classes` is the null (unconditional) class."""
        config = self.transformer.config
        for key in ("num_embeds_ada_norm", "num_classes"):
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        if self.config.id2label:
            return len(self.config.id2label)
        raise ValueError(
            "Cannot tell the number of classes: the transformer config has neither `num_embeds_ada_norm` nor "
            "`num_classes`, and the pipeline has no `id2label`."
        )

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id, from `id2label`; comma-separated synonyms ("tench, Tinca tinca") map to the same id."""
        label2id = {}
        for key, name in (self.config.id2label or {}).items():
            label2id[name] = int(key)
        for key, name in (self.config.id2label or {}).items():
            for synonym in name.split(","):
                label2id.setdefault(synonym.strip(), int(key))
        return label2id

    def get_label_ids(self, label: int | str | list[int | str]) -> list[int]:
        """Class ids for ints and/or names (looked up in `id2label`); raises `ValueError` for unknown names or ids."""
        if isinstance(label, torch.Tensor):
            label = label.flatten().tolist()
        if isinstance(label, (str, numbers.Integral)):
            label = [label]
        label = list(label)
        if len(label) == 0:
            raise ValueError("`class_labels` is empty: pass at least one class id or name.")
        num_classes = self.num_classes
        label2id = self.labels
        ids = []
        for item in label:
            if isinstance(item, str):
                if item not in label2id:
                    names = sorted(label2id)
                    shown = ", ".join(repr(n) for n in names[:50]) or "none (the pipeline has no id2label)"
                    if len(names) > 50:
                        shown += f", ... ({len(names)} in all, see `pipe.labels`)"
                    raise ValueError(f"Unknown class name {item!r}. Valid names: {shown}.")
                ids.append(label2id[item])
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise ValueError(f"Class labels must be ints or names (str), got {item!r} of type {type(item)}.")
            if not 0 <= ids[-1] < num_classes:
                raise ValueError(
                    f"Class id {ids[-1]} is out of range: valid ids are 0..{num_classes - 1} "
                    f"({num_classes} is the null class used for guidance)."
                )
        return ids

    # ----------------------------------------------------------------------------------------------------- decode

    def _vae_is_video(self) -> bool:
        # Video autoencoders (AutoencoderKLQwenImage, Wan, ...) are built from 3D convolutions and want (B, C, T, H, W).
        return any(isinstance(module, torch.nn.Conv3d) for module in self.vae.modules())

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, ...) -> the autoencoder's latents `z = x * std + mean` (float32), with per-channel
        statistics broadcast as (1, C, 1, ...) and per-position ones as (1, C, ...)."""
        mean = _broadcast_statistic(self.config.latents_mean, 0.0, latents)
        std = _broadcast_statistic(self.config.latents_std, 1.0, latents)
        return latents.float() * std + mean

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]: `z = x * std + mean`, then decode."""
        z = self.denormalize_latents(latents)  # (B, C, h, w)
        if self._vae_is_video():
            z = z.unsqueeze(2)  # (B, C, 1, h, w): an image is a 1-frame video
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        if image.ndim == 5:
            image = image[:, :, 0]  # (B, 3, H, W)
        return image

    def decode_and_postprocess(self, latents: torch.Tensor, output_type: str, generator=None) -> object:
        """The sampling loop's last step (a hook that `DiTFlowMatchVideoPipeline` overrides): decode the normalised
        latents with the autoencoder in eval mode, then `output_type` ("pil", "np" or "pt") images."""
        was_training = self.vae.training
        self.vae.eval()
        try:
            images = self.decode_latents(latents)
        finally:
            self.vae.train(was_training)
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    # ---------------------------------------------------------------------------------------------------- latents

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of the sampled latents, from the transformer config: (B, C, h, w) here, (B, C, T', h, w) for
        videos (a hook that `DiTFlowMatchVideoPipeline` overrides)."""
        config = self.transformer.config
        return (batch_size, config.in_channels, config.sample_size, config.sample_size)

    def prepare_latents(
        self,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial noise x_1 ~ N(0, I) of `_latent_shape(batch_size)` drawn from `generator`, or the given
        `latents` (checked to have that shape)."""
        shape = self._latent_shape(batch_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(
                f"`latents` must have shape {tuple(shape)} (one per class label, the transformer's latent size), got "
                f"{tuple(latents.shape)}."
            )
        return latents.to(device=device, dtype=dtype)

    # ---------------------------------------------------------------------------------------------------- sampling

    def check_inputs(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        shift: float,
        output_type: str,
        guidance_interval: tuple[float, float] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                "`callback_on_step_end` must be callable as `(pipe, step_index, timestep, callback_kwargs) -> dict`, "
                f"got {type(callback_on_step_end).__name__}."
            )
        if callback_on_step_end_tensor_inputs is not None:
            if isinstance(callback_on_step_end_tensor_inputs, str):
                raise ValueError(
                    "`callback_on_step_end_tensor_inputs` must be a list of names, e.g. "
                    f"[{callback_on_step_end_tensor_inputs!r}], not a string."
                )
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                    f"{unknown}."
                )
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
                raise ValueError(
                    f"`guidance_interval` must be (sigma_min, sigma_max) with 0 <= sigma_min <= sigma_max <= 1, got "
                    f"{guidance_interval!r}."
                )
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if shift <= 0:
            raise ValueError(f"`shift` must be positive (1 = no shift), got {shift}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (1 = no guidance), got {guidance_scale}.")
        if self.scheduler.config.use_dynamic_shifting:
            raise ValueError(
                "The scheduler uses resolution-dependent (dynamic) shifting, which needs `mu`; this pipeline applies "
                "the paper's fixed shift (eq. 3). Use a FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=False."
            )
        channels = self.transformer.config.in_channels
        latent_shape = tuple(self._latent_shape(1)[1:])  # (C, [T',] h, w)
        for key in ("latents_mean", "latents_std"):
            value = self.config[key]
            if value is not None and len(value) != channels:
                raise ValueError(f"`{key}` has {len(value)} entries but the latents have {channels} channels.")
            if value is not None and _is_nested(value) and _nested_shape(value) != latent_shape:
                raise ValueError(
                    f"`{key}` holds per-position statistics of shape {_nested_shape(value)}, but the transformer "
                    f"samples latents of shape {latent_shape} (C, [T',] h, w): give statistics of that shape, or "
                    f"per-channel ones ({channels} values)."
                )
        std = self.config.latents_std
        if std is not None and np.min(std) <= 0:
            shown = f"a minimum of {np.min(std)}" if _is_nested(std) else std
            raise ValueError(f"`latents_std` must be positive, got {shown}.")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        shift: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate one image per class label.

        Args:
            class_labels (`int`, `str` or a list of them):
                Class ids (`0..num_classes - 1`) or names from `id2label`.
            num_inference_steps (`int`, defaults to 50):
                Number of Euler steps (= transformer evaluations) on the grid `t_i = 1 - i / N`, shifted by eq. 3.
            guidance_scale (`float`, defaults to 1.0):
                Classifier-free guidance `v = v_uncond + g (v_cond - v_uncond)`, with the null class id
                `num_classes`; off (one forward pass per step) when `<= 1`.
            shift (`float`, *optional*):
                Time shift `s` of eq. 3, `t' = 1 - (1 - t) / (s + (1 - s)(1 - t)) = s t / (1 + (s - 1) t)`;
                defaults to the scheduler's configured `shift` (1.0, no shift, for a default scheduler).
            guidance_interval (`tuple[float, float]`, *optional*):
                `(sigma_min, sigma_max)`: apply guidance only at the steps whose current noise level `sigma` (after
                the shift; 1 = noise, 0 = data) lies in `[sigma_min, sigma_max]`, and a single conditional pass at
                the others (Kynkanniemi et al., 2024, "Applying guidance in a limited interval", which the paper
                cites; the authors' sampler has the same `t_min`/`t_max` option). `None`: guidance at every step.
            generator (`torch.Generator` or a list of them, *optional*):
                Makes the initial noise, hence the images, deterministic.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (list of PIL images), `"np"` (B, H, W, 3) float in [0, 1], `"pt"` (B, 3, H, W) in [0, 1], or
                `"latent"` (B, C, h, w) float32 latents in the transformer's normalised space.
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step as `callback_on_step_end(self, step_index, timestep,
                callback_kwargs)`, where `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs`; the dict it returns may replace `latents` (as in diffusers).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Which tensors the callback gets: `"latents"`, the latents after the scheduler step (the new `x_t`),
                and/or `"x0_pred"`, the model's prediction of the clean latent at this step, `x_t - sigma * v` with
                the (guided) velocity `v` and the step's noise level `sigma` (before the step). Both are in the
                transformer's normalised latent space: decode them with `pipe.decode_latents` (the paper's Fig. 6).

        Returns:
            [`ImagePipelineOutput`] with `images`, or the tuple `(images,)`.

        Examples:

            >>> pipe = DiffusionPipeline.from_pretrained("path/to/pipeline", trust_remote_code=True)
            >>> images = pipe(["cat", 3], num_inference_steps=50, guidance_scale=4.0, shift=3.0).images
        """
        images = self._sample(
            class_labels, num_inference_steps, guidance_scale, shift, guidance_interval, generator, output_type,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @torch.no_grad()
    def _sample(
        self,
        class_labels: int | str | list[int | str],
        num_inference_steps: int,
        guidance_scale: float,
        shift: float | None,
        guidance_interval: tuple[float, float] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
        latents: torch.Tensor | None = None,
        **decode_kwargs,
    ):
        """The sampling loop of `__call__` (see its arguments), shared by the image and video pipelines: the latent
        shape comes from `prepare_latents` (`_latent_shape`), the output from `decode_and_postprocess(latents,
        output_type, generator, **decode_kwargs)`, or the latents themselves for `output_type="latent"`."""
        # 1. Check inputs before any sampling
        shift = float(self.scheduler.config.shift if shift is None else shift)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            num_inference_steps, guidance_scale, shift, output_type, guidance_interval, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        class_ids = self.get_label_ids(class_labels)
        device = self._execution_device
        transformer = self.transformer
        channels = transformer.config.in_channels
        do_cfg = guidance_scale > 1.0
        self_conditioning = bool(getattr(transformer.config, "self_conditioning", False))

        # 2. Initial noise x_1 ~ N(0, I) and class labels (the null class `num_classes` for the unconditional half).
        # The latents stay float32 through the loop (the transformer sees them in its own dtype): bf16 Euler updates
        # of sigma-step size are rounded away against |x| ~ 1, and the same generator gives the same noise in any dtype
        batch_size = len(class_ids)
        latents = self.prepare_latents(batch_size, torch.float32, device, generator, latents)
        labels = torch.tensor(class_ids, device=device, dtype=torch.long)
        null_labels = torch.full_like(labels, self.num_classes)  # the unconditional branch of guidance

        # 3. Timesteps: the uniform grid 1, 1 - 1/N, ..., 1/N shifted once by the scheduler (its shift map is eq. 3);
        # custom sigmas are shifted by `scheduler.shift`, so they go in unshifted. Unlike the default grid
        # (1 .. 1/num_train_timesteps), every one of the N steps is a full step and the last one lands on sigma = 0.
        previous_shift = self.scheduler.shift
        self.scheduler.set_shift(shift)
        try:
            unshifted = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
            self.scheduler.set_timesteps(sigmas=unshifted, device=device)
        finally:
            self.scheduler.set_shift(previous_shift)
        timesteps = self.scheduler.timesteps  # sigma * num_train_timesteps, the DiT's 0..1000 scale
        self._num_timesteps = len(timesteps)

        # 4. Euler integration from sigma = 1 (noise) to 0 (data); no dropout, whatever mode the models were left in
        was_training = transformer.training
        transformer.eval()
        self_cond = {"cond": None, "uncond": None}  # each branch feeds its own last-block activations back
        try:
            for i, t in enumerate(self.progress_bar(timesteps)):
                sigma = float(self.scheduler.sigmas[i])
                guided = do_cfg and (  # the scheduler's sigmas are float32: ends inclusive to 1e-6
                    guidance_interval is None or guidance_interval[0] - 1e-6 <= sigma <= guidance_interval[1] + 1e-6
                )
                branches = ("cond", "uncond") if guided else ("cond",)
                model_input = torch.cat([latents] * len(branches)).to(transformer.dtype)  # (B or 2B, C, [T',] h, w)
                step_labels = torch.cat([labels, null_labels]) if guided else labels
                timestep = t.expand(model_input.shape[0]).to(device)
                kwargs = {"self_cond": None} if self_conditioning else {}
                if self_conditioning and self_cond["cond"] is not None:
                    fed = [self_cond[b] if self_cond[b] is not None else torch.zeros_like(self_cond["cond"])
                           for b in branches]  # fmt: skip
                    kwargs["self_cond"] = torch.cat(fed)
                output = transformer(
                    hidden_states=model_input, timestep=timestep, class_labels=step_labels, return_dict=True, **kwargs
                )
                if self_conditioning:  # fed back at the next step
                    self_cond.update(zip(branches, output.last_hidden_state.chunk(len(branches))))
                velocity = output.sample[:, :channels]  # drop extra outputs (e.g. learned sigma)
                if guided:
                    v_cond, v_uncond = velocity.chunk(2)
                    velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
                step_inputs = {}
                if callback_on_step_end is not None and "x0_pred" in callback_on_step_end_tensor_inputs:
                    # x_t = (1 - sigma) x0 + sigma noise and v = noise - x0 give x0 = x_t - sigma v
                    step_inputs["x0_pred"] = (latents.float() - sigma * velocity.float()).to(latents.dtype)
                latents = self.scheduler.step(velocity.float(), t, latents, return_dict=False)[0]  # float32
                if callback_on_step_end is not None:
                    step_inputs["latents"] = latents
                    callback_kwargs = {k: step_inputs[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents).to(device=device, dtype=torch.float32)
        finally:
            transformer.train(was_training)

        # 5. Decode
        if output_type == "latent":
            output = latents
        else:
            output = self.decode_and_postprocess(latents, output_type, generator, **decode_kwargs)

        self.maybe_free_model_hooks()
        return output

    # ------------------------------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """`DiffusionPipeline.save_pretrained`, then the remote-code layout:

        - `pipeline.py`: a copy of this file (both pipeline classes), `model_index.json` `_class_name: ["pipeline",
          "<this class>"]` (`DiTFlowMatchPipeline` or `DiTFlowMatchVideoPipeline`);
        - a component whose class is not from diffusers/transformers (a custom transformer): its source file copied
          into the component folder as `<module>.py`, and `model_index.json` naming it `["<module>", "<ClassName>"]`.

        so that `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)` loads it without this
        toolkit, and `DiTFlowMatchPipeline.from_pretrained(save_directory)` still does. `push_to_hub=True` pushes
        after the layout is written.
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs
        }
        super().save_pretrained(save_directory, **kwargs)

        shutil.copyfile(inspect.getfile(type(self)), os.path.join(save_directory, "pipeline.py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = ["pipeline", type(self).__name__]
        for name in _COMPONENTS:
            component = getattr(self, name, None)
            if component is None:
                continue
            component_cls = type(getattr(component, "_orig_mod", component))  # torch.compile wraps the model
            if component_cls.__module__.split(".")[0] in _KNOWN_LIBRARIES:
                continue
            source = inspect.getfile(component_cls)
            module_name = os.path.splitext(os.path.basename(source))[0]
            with open(source, encoding="utf-8") as f:
                code = f.read()
            if any(line.lstrip().startswith("from .") for line in code.splitlines()):
                logger.warning(
                    f"{source} has relative imports: the copy in {name}/ will not load as remote code unless the "
                    "class is made self-contained."
                )
            shutil.copyfile(source, os.path.join(save_directory, name, f"{module_name}.py"))
            index[name] = [module_name, component_cls.__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            private = hub_kwargs.pop("private", None)
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=hub_kwargs.get("token")).repo_id
            self._upload_folder(save_directory, repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Load a pipeline saved by [`~DiTFlowMatchPipeline.save_pretrained`] as this class.

        `DiffusionPipeline.from_pretrained` would take the saved `pipeline.py` (and a custom transformer's file) as
        remote code; here the pipeline class is `cls`, and each component is loaded from its folder:

        - diffusers classes from diffusers;
        - a custom class saved as `<component>/<module>.py` from an already imported module of that name (for example
          `my_package.models.<module>`; as diffusers does for components, nothing is imported on the repository's
          word), or from the saved file when `trust_remote_code=True`.

        Components can be passed directly (`transformer=...`), and `id2label`, `latents_mean`, `latents_std` and
        `provenance` override the saved ones; other keyword arguments go to every model's `from_pretrained` (`torch_dtype`,
        `variant`, ...). A Hub repository id is downloaded first (`revision`, `cache_dir`, `token`, `local_files_only`).
        """
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
            folder = snapshot_download(folder, **{k: kwargs.pop(k) for k in hub_keys if k in kwargs})

        config = cls.load_config(folder)
        init_kwargs = {
            key: kwargs.pop(key, config.get(key)) for key in ("id2label", "latents_mean", "latents_std", "provenance")
        }
        passed = {name: kwargs.pop(name) for name in _COMPONENTS if name in kwargs}
        for name in _COMPONENTS:
            if name in passed:
                continue
            library, class_name = config[name]
            component_cls = _component_class(folder, name, library, class_name, trust_remote_code)
            load_kwargs = kwargs if issubclass(component_cls, ModelMixin) else {}
            passed[name] = component_cls.from_pretrained(os.path.join(folder, name), **load_kwargs)

        pipe = cls(**passed, **init_kwargs)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe


def _component_class(folder: str, name: str, library: str, class_name: str, trust_remote_code: bool) -> type:
    """The class model_index.json names for component `name` (see `DiTFlowMatchPipeline.from_pretrained`)."""
    module_file = os.path.join(folder, name, f"{library}.py")
    if os.path.isfile(module_file):
        # A custom class saved next to its weights as remote code.
        if trust_remote_code:
            return get_class_from_dynamic_module(
                os.path.join(folder, name), module_file=f"{library}.py", class_name=class_name, trust_remote_code=True
            )
        for module_name, module in list(sys.modules.items()):
            if module_name == library or module_name.endswith(f".{library}"):
                candidate = getattr(module, class_name, None)
                if inspect.isclass(candidate):
                    return candidate
        raise ValueError(
            f"The {name} is the custom class {class_name}, saved in {module_file}. Import the module that defines it "
            f"(a module named `{library}`) before loading, pass `trust_remote_code=True` to run the saved file, or "
            f"pass `{name}=...` directly."
        )
    if library in _KNOWN_LIBRARIES:
        return getattr(importlib.import_module(library), class_name)
    module = sys.modules.get(library)
    if module is None or not hasattr(module, class_name):
        raise ValueError(
            f"The {name} is {library}.{class_name}, which is not imported: import `{library}` first or pass `{name}=...`."
        )
    return getattr(module, class_name)


# ------------------------------------------------------------------------------------------------------------ video


@dataclass
class DiTFlowMatchVideoPipelineOutput(BaseOutput):
    r"""
    Output of [`DiTFlowMatchVideoPipeline`], as diffusers' video pipelines return it.

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            `"np"`: (B, T, H, W, 3) float in [0, 1]; `"pt"`: (B, T, 3, H, W) in [0, 1]; `"pil"`: B lists of T PIL
            images (each list goes to `diffusers.utils.export_to_gif` / `export_to_video` as it is); `"latent"`:
            the normalised latents (B, C, T', h, w).
    """

    frames: torch.Tensor


class DiTFlowMatchVideoPipeline(DiTFlowMatchPipeline):
    r"""
    Class-conditional video generation with a latent video DiT trained by rectified flow (the paper's video DiT,
    Section 4 and Appendix B: the image DiT with the temporal axis unrolled), sampled exactly as
    [`DiTFlowMatchPipeline`] samples images (Euler steps of `FlowMatchEulerDiscreteScheduler`, eq. 3 time shift,
    classifier-free guidance with the null class, optionally inside `guidance_interval`, self-conditioning per branch,
    `callback_on_step_end`), on latents (B, C, T', h, w) whose size comes from the transformer config (`in_channels`,
    `num_frames` = T', `sample_size` = h = w), decoded by a video autoencoder into frames.

    Args:
        transformer ([`ModelMixin`]):
            A class-conditional video velocity model `transformer(hidden_states, timestep, class_labels)` on
            (B, C, T', h, w) latents whose config has `num_frames`, e.g. the toolkit's `SelfConditionedVideoDiT`
            (with `self_conditioning=True` it also takes `self_cond` and returns `last_hidden_state`).
        vae ([`ModelMixin`]):
            The video autoencoder the latents came from (`AutoencoderKLCogVideoX`, `AutoencoderKLLTXVideo`, ...),
            decoding (B, C, T', h, w) latents to (B, 3, T, H, W) frames. LTX decoders with `timestep_conditioning`
            are decoded as diffusers' `LTXPipeline` does (noise mixed into the latents, `temb = decode_timestep`).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            The Euler flow-matching scheduler; its `shift` is set per call.
        id2label, provenance:
            As for [`DiTFlowMatchPipeline`].
        latents_mean, latents_std (`list`, *optional*):
            Per-channel statistics (C values), or per-position ones, nested lists of shape (C, T', h, w) (the
            latents extraction's `--per_position_statistics`); `z = x * std + mean` before decoding.
    """

    def __init__(
        self,
        transformer: ModelMixin,
        vae: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler,
        id2label: dict[str, str] | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        provenance: dict | None = None,
    ):
        super().__init__(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            id2label=id2label,
            latents_mean=latents_mean,
            latents_std=latents_std,
            provenance=provenance,
        )
        self.video_processor = VideoProcessor(do_resize=False, do_normalize=True)
        self._check_video_components()

    # ------------------------------------------------------------------------------------------------------ checks

    def _check_video_components(self):
        """Refuse an image transformer (no `num_frames` in its config) or an image autoencoder (no 3D convolution)."""
        transformer = getattr(self, "transformer", None)
        if transformer is not None and getattr(transformer.config, "num_frames", None) is None:
            raise ValueError(
                f"DiTFlowMatchVideoPipeline needs a video transformer, but the {type(transformer).__name__} config has "
                "no `num_frames` (the latent frames T'): it is an image transformer. Sample images with "
                "DiTFlowMatchPipeline, or pass a video transformer on (B, C, T', h, w) latents such as "
                "SelfConditionedVideoDiT (config with in_channels, num_frames, sample_size)."
            )
        vae = getattr(self, "vae", None)
        if vae is not None and not self._vae_is_video():
            raise ValueError(
                f"DiTFlowMatchVideoPipeline needs a video autoencoder that decodes (B, C, T', h, w) latents into "
                f"frames (AutoencoderKLCogVideoX, AutoencoderKLLTXVideo, ...), but {type(vae).__name__} is an image "
                "autoencoder (no 3D convolution). Pass the video autoencoder the transformer's latents came from, or "
                "sample images with DiTFlowMatchPipeline."
            )

    def check_inputs(self, *args, **kwargs):
        self._check_video_components()  # the components may have been swapped since __init__
        super().check_inputs(*args, **kwargs)

    @staticmethod
    def _per_sample(name: str, value, batch_size: int) -> list[float]:
        """`decode_timestep` / `decode_noise_scale`: one number for every sample, or a list of `batch_size`."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in values):
            raise ValueError(f"`{name}` must be a number or a list of numbers (one per sample), got {value!r}.")
        if isinstance(value, (list, tuple)) and len(values) != batch_size:
            raise ValueError(
                f"`{name}` has {len(values)} values but {batch_size} videos are sampled: pass one number, or one "
                "value per class label."
            )
        return [float(v) for v in values] * (1 if isinstance(value, (list, tuple)) else batch_size)

    # ----------------------------------------------------------------------------------------------------- latents

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """(B, C, T', h, w) from the transformer config: `in_channels`, `num_frames`, `sample_size` (int or (h, w))."""
        self._check_video_components()
        config = self.transformer.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, numbers.Integral) else (int(size[0]), int(size[1]))
        return (batch_size, config.in_channels, int(config.num_frames), height, width)

    def prepare_latents(self, batch_size, dtype, device, generator=None, latents=None) -> torch.Tensor:
        if latents is not None and latents.ndim != 5:
            raise ValueError(
                f"`latents` must be video latents (B, C, T', h, w), got shape {tuple(latents.shape)}: image latents "
                "(B, C, h, w) are sampled with DiTFlowMatchPipeline; for this pipeline pass noise of shape "
                f"{tuple(self._latent_shape(batch_size))}, or leave `latents` out."
            )
        return super().prepare_latents(batch_size, dtype, device, generator, latents)

    # ------------------------------------------------------------------------------------------------------ decode

    def _mix_decode_noise(
        self,
        z: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        decode_timestep: float | list[float],
        decode_noise_scale: float | list[float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What diffusers' LTX pipelines do before a timestep-conditioned decode: `z = (1 - s) z + s noise` with
        `noise` drawn from `generator` (`randn_tensor`, after the sampling noise), `s = decode_noise_scale` (defaults
        to `decode_timestep` when `None`) per sample, and `temb = decode_timestep` per sample. LTX-Video mixes in its
        raw latent space (`LTXPipeline`, after denormalising), LTX-2 in the VAE's normalised one (`LTX2Pipeline`,
        before `_denormalize_latents` with the VAE's `latents_mean` / `latents_std` / `scaling_factor`)."""
        batch_size = z.shape[0]
        timestep = self._per_sample("decode_timestep", decode_timestep, batch_size)
        scale = timestep if decode_noise_scale is None else decode_noise_scale
        scale = self._per_sample("decode_noise_scale", scale, batch_size)
        noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        s = torch.tensor(scale, device=z.device, dtype=z.dtype).view(-1, *[1] * (z.ndim - 1))
        if type(self.vae).__name__ == "AutoencoderKLLTX2Video":
            view = (1, -1, *[1] * (z.ndim - 2))
            vae_mean = self.vae.latents_mean.view(view).to(z)
            vae_std = self.vae.latents_std.view(view).to(z)
            scaling = float(self.vae.config.scaling_factor)
            normalised = (z - vae_mean) * scaling / vae_std
            z = ((1 - s) * normalised + s * noise) * vae_std / scaling + vae_mean
        else:
            z = (1 - s) * z + s * noise
        return z, torch.tensor(timestep, device=z.device, dtype=z.dtype)

    def _injects_decoder_noise(self, device: torch.device) -> bool:
        """Whether the decoder draws noise from torch's global RNG (LTX's `decoder_inject_noise`) on a device whose
        RNG the pipeline can seed (CPU, CUDA)."""
        inject = getattr(self.vae.config, "decoder_inject_noise", None)
        return bool(inject) and any(inject) and device.type in ("cpu", "cuda")

    @contextlib.contextmanager
    def _decoder_noise_rng(self, generator: torch.Generator | list[torch.Generator] | None, device: torch.device):
        """LTX decoders with `decoder_inject_noise` draw noise inside diffusers from torch's global RNG; with a
        `generator` (its first one for a list), run the decode with the global RNG seeded from one draw of it and
        restored afterwards, so that the same generator gives the same frames. Otherwise nothing changes."""
        if generator is None or not self._injects_decoder_noise(device):
            yield
            return
        first = generator[0] if isinstance(generator, list) else generator
        seed = int(torch.randint(0, 2**62, (1,), generator=first, device=first.device).item())
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)  # this device only (fork_rng restores just it)
            yield

    def decode_latents(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decode_timestep: float | list[float] = 0.05,
        decode_noise_scale: float | list[float] | None = 0.025,
    ) -> torch.Tensor:
        """Normalised latents (B, C, T', h, w) -> frames (B, 3, T, H, W) in [-1, 1]: `z = x * std + mean`, then the
        video autoencoder's decode (for a timestep-conditioned LTX decoder `decode(z', temb=decode_timestep)` with
        `z'` mixed with noise from `generator`, see `_mix_decode_noise`), clamped to [-1, 1]. A decoder that injects
        noise with a list of generators decodes each sample on its own, its noise drawn from its own generator: a
        sample's frames do not depend on the other samples of the batch."""
        if latents.ndim != 5:
            raise ValueError(
                f"Expected video latents (B, C, T', h, w), got shape {tuple(latents.shape)}: decode image latents "
                "with DiTFlowMatchPipeline."
            )
        z = self.denormalize_latents(latents)  # (B, C, T', h, w)
        timestep = None
        if getattr(self.vae.config, "timestep_conditioning", False):
            z, timestep = self._mix_decode_noise(z, generator, decode_timestep, decode_noise_scale)
        z = z.to(self.vae.dtype)
        temb = None if timestep is None else timestep.to(self.vae.dtype)
        if isinstance(generator, list) and len(generator) > 1 and self._injects_decoder_noise(z.device):
            parts = []
            for i, sample_generator in enumerate(generator):
                with self._decoder_noise_rng(sample_generator, z.device):
                    parts.append(self._vae_decode(z[i : i + 1], None if temb is None else temb[i : i + 1]))
            video = torch.cat(parts)
        else:
            with self._decoder_noise_rng(generator, z.device):
                video = self._vae_decode(z, temb)
        return video.clamp(-1.0, 1.0)  # (B, 3, T, H, W)

    def _vae_decode(self, z: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        if temb is None:
            return self.vae.decode(z, return_dict=False)[0]
        return self.vae.decode(z, temb=temb, return_dict=False)[0]

    def decode_and_postprocess(
        self,
        latents: torch.Tensor,
        output_type: str,
        generator=None,
        decode_timestep: float | list[float] = 0.05,
        decode_noise_scale: float | list[float] | None = 0.025,
    ) -> object:
        """Decode (in eval mode) and turn the frames into `output_type` as diffusers' `VideoProcessor` does."""
        was_training = self.vae.training
        self.vae.eval()
        try:
            video = self.decode_latents(latents, generator, decode_timestep, decode_noise_scale)
        finally:
            self.vae.train(was_training)
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    # ---------------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        shift: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        decode_timestep: float | list[float] = 0.05,
        decode_noise_scale: float | list[float] | None = 0.025,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> DiTFlowMatchVideoPipelineOutput | tuple:
        r"""
        Generate one video per class label.

        Args:
            class_labels, num_inference_steps, guidance_scale, shift, guidance_interval:
                As for [`DiTFlowMatchPipeline.__call__`]: class ids or names; Euler steps on the eq. 3-shifted grid;
                classifier-free guidance with the null class when `guidance_scale > 1` (two passes per guided step,
                one otherwise); the time shift (defaults to the scheduler's); guidance only for sigma inside
                `(sigma_min, sigma_max)`.
            generator (`torch.Generator` or a list of them, *optional*):
                Makes the initial noise, and the decode noise of a timestep-conditioned LTX decoder, deterministic.
            latents (`torch.Tensor`, *optional*):
                The initial noise (B, C, T', h, w) instead of drawing it from `generator`.
            output_type (`str`, defaults to `"np"`):
                `"np"` (B, T, H, W, 3) float in [0, 1], `"pt"` (B, T, 3, H, W) in [0, 1], `"pil"` (B lists of T PIL
                images), or `"latent"` (B, C, T', h, w) float32 latents in the transformer's normalised space.
            return_dict (`bool`, defaults to `True`):
                Return a [`DiTFlowMatchVideoPipelineOutput`] instead of a tuple.
            decode_timestep (`float` or a list of them, defaults to 0.05):
                The decoder timestep of an LTX autoencoder with `timestep_conditioning` (ignored otherwise).
            decode_noise_scale (`float` or a list of them, defaults to 0.025):
                How much noise is mixed into the latents before such a decode, `z = (1 - s) z + s noise`; `None`:
                `decode_timestep` (as in diffusers' `LTXPipeline`).
            callback_on_step_end, callback_on_step_end_tensor_inputs:
                As for [`DiTFlowMatchPipeline.__call__`]; `"latents"` and `"x0_pred"` are (B, C, T', h, w), decoded
                with `pipe.decode_latents`.

        Returns:
            [`DiTFlowMatchVideoPipelineOutput`] with `frames`, or the tuple `(frames,)`.

        Examples:

            >>> from diffusers.utils import export_to_gif
            >>> pipe = DiffusionPipeline.from_pretrained("path/to/video/pipeline", trust_remote_code=True)
            >>> frames = pipe(["archery", 3], num_inference_steps=50, guidance_scale=3.0, output_type="pil").frames
            >>> export_to_gif(frames[0], "archery.gif")
        """
        class_ids = self.get_label_ids(class_labels)
        if output_type != "latent" and getattr(self.vae.config, "timestep_conditioning", False):
            self._per_sample("decode_timestep", decode_timestep, len(class_ids))  # refused before any sampling
            if decode_noise_scale is not None:
                self._per_sample("decode_noise_scale", decode_noise_scale, len(class_ids))
        frames = self._sample(
            class_ids, num_inference_steps, guidance_scale, shift, guidance_interval, generator, output_type,
            callback_on_step_end, callback_on_step_end_tensor_inputs, latents=latents,
            decode_timestep=decode_timestep, decode_noise_scale=decode_noise_scale,
        )  # fmt: skip
        if not return_dict:
            return (frames,)
        return DiTFlowMatchVideoPipelineOutput(frames=frames)


# ---------------------------------------------------------------------------------------------------------- helpers


def _floats(value) -> list:
    """A (nested) list of Python floats from a list, tuple, array or tensor of numbers (per-position statistics)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_floats(v) for v in value]
    return float(value)


def _is_nested(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple))


def _nested_shape(value) -> tuple[int, ...]:
    try:
        return tuple(np.asarray(value, dtype=np.float64).shape)
    except ValueError as err:
        raise ValueError("Per-position latent statistics must be nested lists of one shape (C, [T',] h, w).") from err


def _broadcast_statistic(value, default: float, latents: torch.Tensor) -> torch.Tensor:
    """`latents_mean` / `latents_std` (or `default` everywhere when unset) as a float32 tensor that broadcasts over
    `latents` (B, C, ...): per-channel (C,) as (1, C, 1, ...), per-position (C, ...) as (1, C, ...)."""
    channels = latents.shape[1]
    t = torch.tensor(value or [default] * channels, device=latents.device, dtype=torch.float32)
    if t.ndim == 1:
        return t.view(1, -1, *[1] * (latents.ndim - 2))
    if tuple(t.shape) != tuple(latents.shape[1:]):
        raise ValueError(
            f"Per-position latent statistics of shape {tuple(t.shape)} do not match latents of shape "
            f"{tuple(latents.shape[1:])} (C, [T',] h, w)."
        )
    return t.unsqueeze(0)

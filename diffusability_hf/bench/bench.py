"""The bench's stages, each the toolkit script a user would run in a fresh process (:class:`Bench`), and the checks of
a generator before it judges (:class:`Instrument`)."""

import math
import os
import threading
import time
from functools import partial

import numpy as np
import torch

from ..data.images import EMBEDDED_VALIDATION_IMAGES, installed_photographs
from ..errors import UsageError
from ..metrics.bench import (
    class_accuracy,
    class_position_means,
    instrument_flags,
    layout_correlation,
    thumbnail_features,
    well_above_chance,
)
from ..models.dit import RECIPES
from .data import image_folder_items, load_items, load_samples, make_feature_spaces, write_crops
from .rules import last_interval
from .runner import Stages, cpu_cores, in_parallel
from .settings import FEATURES, ROOT, SCRIPTS, ae_args, cut_ratios, fd_values, read_json, slug


class Bench:
    """The bench's stages over a set of autoencoders: the data and feature spaces of a resolution, stage I runs,
    the evaluations of a group of AEs, latents, and DiT runs keyed by (AE, recipe, steps, seed)."""

    def __init__(self, args, cfg, out):
        if not os.path.isfile(os.path.join(SCRIPTS, "train_ae_se.py")):  # an install that is not the clone's
            raise UsageError(
                f"The bench runs the toolkit's scripts, which are not in {SCRIPTS}: install the toolkit from its "
                "clone with `pip install -e .` and run the bench there."
            )
        self.args, self.cfg, self.out = args, cfg, out
        self.stages = Stages(out, SCRIPTS, ROOT)
        self.cores, self.jobs = cpu_cores(), args.jobs
        self.sources, self.features = {}, {}
        # parallel stage-I tasks ask for the same data and feature spaces: the first writes them, the others wait
        self.prepare = threading.RLock()
        self.models, self.info = {}, {}  # label -> path spec; label -> protocol, resolution, made by the bench
        self.instruments = {}  # resolution -> Instrument

    def parallel(self, tasks):
        return in_parallel(tasks, self.jobs, self.cores)

    def suffix(self, res):
        """Folder suffix of a resolution that is not the run's main one (the ablation's 64 px cell)."""
        return "" if res == self.cfg["resolution"] else f"_{res}px"

    # 0. Data
    def data(self, res):
        """The script arguments of the training, held-out and reference data at ``res`` (written once)."""
        with self.prepare:
            if res not in self.sources:
                self.sources[res] = self._write_data(res)
            return self.sources[res]

    def _write_data(self, res):
        cfg, start = self.cfg, time.time()
        if self.args.user_data:
            train = (["--train_data_dir", cfg["train_data_dir"]] if cfg["train_data_dir"] else
                     ["--dataset_name", cfg["dataset_name"]])  # fmt: skip
            heldout = (["--data_dir", cfg["validation_data_dir"] or cfg["train_data_dir"]] if cfg["train_data_dir"]
                       else ["--dataset_name", cfg["dataset_name"], "--split", cfg["validation_split"]])  # fmt: skip
            held = cfg["validation_data_dir"] or (
                f"split {cfg['validation_split']}" if cfg["dataset_name"] else
                "NOT held out (no --validation_data_dir: the training folder)")  # fmt: skip
            src = dict(train=train, heldout=heldout, reference=heldout, train_dir=cfg["train_data_dir"],
                       test_dir=cfg["validation_data_dir"] or cfg["train_data_dir"], photos={},
                       note=f"the user's data ({cfg['train_data_dir'] or cfg['dataset_name']}); held out: {held}")  # fmt: skip
        else:
            names = installed_photographs()
            heldout_names = [n for n in names if n in EMBEDDED_VALIDATION_IMAGES]
            train_names = [n for n in names if n not in heldout_names]
            data = os.path.join(self.out, "data" + self.suffix(res))
            write_crops(os.path.join(data, "train"), train_names, cfg["train_crops"], res, seed=0)
            write_crops(os.path.join(data, "reference"), train_names, cfg["reference_crops"], res, seed=1)
            write_crops(os.path.join(data, "heldout"), heldout_names, cfg["heldout_crops"], res, seed=2)
            src = dict(
                train=["--train_data_dir", os.path.join(data, "train")],
                heldout=["--data_dir", os.path.join(data, "heldout")],
                reference=["--data_dir", os.path.join(data, "reference")],
                train_dir=os.path.join(data, "train"), test_dir=os.path.join(data, "reference"),
                photos={"train": train_names, "heldout": heldout_names},
                note=(f"{len(names)} colour photographs of the installed packages; classes (training): "
                      f"{', '.join(train_names)}; held out (never trained on): {', '.join(heldout_names)}. "
                      f"{cfg['train_crops']} training crops, {cfg['reference_crops']} reference crops (other seed), "
                      f"{cfg['heldout_crops']} held-out crops, {res} px, each a random region of 1 to 4 crop sides"),
            )  # fmt: skip
        self.stages.record("data" + self.suffix(res), time.time() - start)
        return src

    def feature_spaces(self, res):
        with self.prepare:
            if res not in self.features:
                start, src = time.time(), self.data(res)
                folder = os.path.join(self.out, "features" + self.suffix(res)) if self.suffix(res) else self.out
                os.makedirs(folder, exist_ok=True)
                self.features[res] = make_feature_spaces(folder, src["train_dir"], src["test_dir"], res,
                                                         self.cfg["classifier_steps"])  # fmt: skip
                self.stages.record("feature_spaces" + self.suffix(res), time.time() - start)
            return self.features[res]

    # 1. Stage I
    def train_ae(self, label, start, se_weight, steps, lr, res, protocol, threads, extra=()):
        """``train_ae_se.py`` from ``start`` (``--pretrained_model_name_or_path`` or ``--model_config_name_or_path``
        arguments) on the bench's training data; everything but ``se_weight`` and ``extra`` is shared."""
        cfg, folder = self.cfg, os.path.join(self.out, "ae", slug(label))
        self.stages.script(
            f"train_{slug(label)}", os.path.join(folder, "config.json"), "train_ae_se.py", *start,
            *self.data(res)["train"], "--resolution", res, "--train_batch_size", cfg["ae_batch"], "--lpips_weight", 0,
            "--random_flip", "--seed", cfg.get("ae_seed", 0), "--report_to", "none", "--checkpoints_total_limit", 1, "--se_weight",
            se_weight, "--learning_rate", lr, "--max_train_steps", steps, "--validation_steps", steps,
            "--checkpointing_steps", steps, *extra, "--output_dir", folder, threads=threads,
        )  # fmt: skip
        self.add(label, folder, protocol, res, made=True)

    def add(self, label, path, protocol, res, made=False):
        self.models[label] = path
        self.info[label] = {"protocol": protocol, "resolution": res, "made_by_the_bench": made}

    # 2-3. Reconstruction, DCT cut, spectra
    def evaluate(self, labels):
        """eval_ae.py (held-out: PSNR, SSIM, DCT cut; reference: rFD in both feature spaces) and
        analyze_spectrum.py (normalised posterior samples; raw means) of ``labels``, which share a resolution."""
        res = self.info[labels[0]]["resolution"]
        src, (features, _) = self.data(res), self.feature_spaces(res)
        specs = [f"{label}={self.models[label]}" for label in labels]
        n_held, n_ref, sfx = self.cfg["heldout_crops"], self.cfg["reference_crops"], self.suffix(res)
        runs = {
            "eval_ae": ("metrics.json", "eval_ae.py", *src["heldout"], "--num_samples", n_held, "--metrics", "psnr",
                        "ssim", "--dct_cut_ratios", *cut_ratios(self.cfg)),
            "eval_ae_fd": ("metrics.json", "eval_ae.py", *src["reference"], "--num_samples", n_ref, "--metrics",
                           "fd", "psnr", "--feature_extractor", *[features[n] for n in FEATURES]),
            "spectrum": ("spectrum.json", "analyze_spectrum.py", *src["heldout"], "--num_samples", n_held,
                         "--sample_posterior", "--normalize_latents", "per_channel"),  # what the DiT sees
            "spectrum_means": ("spectrum.json", "analyze_spectrum.py", *src["heldout"], "--num_samples", n_held),
        }  # fmt: skip
        if src["train_dir"]:  # the cheap proxies (diffusability_score.py) need image folders with class subfolders
            held = src["heldout"][1] if src["heldout"][0] == "--data_dir" else src["test_dir"]
            runs["score"] = (
                "scores.json", "diffusability_score.py", "--train_data_dir", src["train_dir"], "--reference_data_dir",
                src["test_dir"], "--heldout_data_dir", held, "--probe_steps", self.cfg["score_probe_steps"],
                "--probe_batch_size", self.cfg["dit_batch"], "--dit_recipe", self.cfg["dit_recipe"], "--dit_width",
                self.cfg["dit_width"], "--dit_depth", self.cfg["dit_depth"], "--dit_heads", self.cfg["dit_heads"],
                "--dit_patch", self.cfg["dit_patch"], "--noise_levels", self.cfg["loss_noise_levels"],
            )  # fmt: skip

        def one(name, threads):
            marker, script, *rest = runs[name]
            folder = os.path.join(self.out, name + sfx)
            self.stages.script(name + sfx, os.path.join(folder, marker), script, "--models", *specs, *rest,
                               "--resolution", res, "--output_dir", folder, threads=threads)  # fmt: skip

        # the DCT cut (eval_ae) decodes every AE eleven times: it goes last, when it gets every core to itself
        self.parallel([partial(one, name) for name in ("eval_ae_fd", "spectrum", "spectrum_means", "score", "eval_ae")
                       if name in runs])  # fmt: skip
        return {name: read_json(self.out, name + sfx, runs[name][0]) for name in runs}

    # 4. Stage II
    def extract(self, label, which, threads):
        """Latents of the training crops (with flips) or of the reference crops (the held-out loss)."""
        res, cfg = self.info[label]["resolution"], self.cfg
        src = self.data(res)
        folder = os.path.join(self.out, f"latents_{which}", slug(label))
        source = src["train"] if which == "train" else (
            ["--train_data_dir", src["reference"][1]] if src["reference"][0] == "--data_dir" else
            ["--dataset_name", cfg["dataset_name"], "--split", cfg["validation_split"]])  # fmt: skip
        extra = ["--flip"] if which == "train" else ["--max_samples", cfg["reference_crops"]]
        self.stages.script(f"extract_{which}_{slug(label)}", os.path.join(folder, "metadata.json"),
                           "extract_latents.py", *ae_args(self.models[label]), *source, "--resolution", res, *extra,
                           "--output_dir", folder, threads=threads)  # fmt: skip

    def recipe(self, recipe=None):
        """``(stock, pos_embed, class_embed_init_std)`` of a recipe name (default: the run's); ``"stock"`` is
        diffusers' DiT with the run's recipe's label-table init."""
        name = recipe or self.cfg["dit_recipe"]
        if name == "stock":
            return True, "sincos", RECIPES[self.cfg["dit_recipe"]]["class_embed_init_std"]
        return False, RECIPES[name]["pos_embed"], RECIPES[name]["class_embed_init_std"]

    def dit_config(self, label, recipe=None):
        """The paper's DiT (App. B: RoPE, self-conditioning; a recipe of :data:`RECIPES`) or diffusers' stock DiT
        (``"stock"``: sin-cos positions, no self-conditioning) at the bench's size, for this AE's latents."""
        meta = read_json(self.out, "latents_train", slug(label), "metadata.json")
        cfg, recipe = self.cfg, recipe or self.cfg["dit_recipe"]
        stock, pos_embed, std = self.recipe(recipe)
        folder = os.path.join(self.out, "dit_configs", f"{slug(label)}-{slug(recipe)}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            channels, size = meta["latent_shape"][0], meta["latent_shape"][1]
            shape = dict(num_attention_heads=cfg["dit_heads"], attention_head_dim=cfg["dit_width"] // cfg["dit_heads"],
                         in_channels=channels, num_layers=cfg["dit_depth"], sample_size=size,
                         patch_size=cfg["dit_patch"], num_embeds_ada_norm=meta["num_classes"])  # fmt: skip
            if not stock:
                from diffusability_hf.models.selfcond_dit import SelfConditionedDiT

                model = SelfConditionedDiT(**shape, pos_embed=pos_embed, self_conditioning=True,
                                           class_embed_init_std=std)  # fmt: skip
            else:
                from diffusers import DiTTransformer2DModel

                model = DiTTransformer2DModel(**shape, out_channels=channels, norm_type="ada_norm_zero")
            model.save_config(folder)
        return folder

    def dit_tag(self, label, seed, recipe=None, steps=None):
        recipe, steps = recipe or self.cfg["dit_recipe"], steps or self.cfg["dit_steps"]
        variant = (
            "" if (recipe, steps) == (self.cfg["dit_recipe"], self.cfg["dit_steps"]) else f"-{slug(recipe)}-{steps}"
        )
        return f"{slug(label)}{variant}-seed{seed}"

    def curve_steps(self, steps):
        every = max(1, steps // self.cfg["curve_points"])
        first = self.cfg.get("fd_curve_from") or every
        return sorted({*range(first, steps, every), steps})

    def generate(self, label, seed, threads, recipe=None, steps=None, curve=True):
        """train_dit_flow.py with pipeline snapshots, then eval_dit.py on every snapshot and the final pipeline
        (which also gets the held-out loss per noise level and the Fig. 6 trajectory)."""
        cfg, steps = self.cfg, steps or self.cfg["dit_steps"]
        res = self.info[label]["resolution"]
        src, (features, _) = self.data(res), self.feature_spaces(res)
        tag = self.dit_tag(label, seed, recipe, steps)
        stock, _, init_std = self.recipe(recipe)
        dit = os.path.join(self.out, "dit", tag)
        curve = self.curve_steps(steps) if curve else [steps]
        # every curve point before the last is a multiple of the snapshot interval
        snapshots = ["--pipeline_snapshot_steps", math.gcd(*curve[:-1])] if len(curve) > 1 else []
        self.stages.script(
            f"dit_{tag}", os.path.join(dit, "model_index.json"), "train_dit_flow.py", "--latents_dir",
            os.path.join(self.out, "latents_train", slug(label)),
            *ae_args(self.models[label], "--pretrained_vae_model_name_or_path", "--vae_subfolder"),
            "--model_config_name_or_path", self.dit_config(label, recipe), *(["--stock_dit"] if stock else []),
            "--class_embed_init_std", init_std, "--max_train_steps", steps, "--train_batch_size", cfg["dit_batch"], "--learning_rate",
            cfg["dit_lr"], "--lr_warmup_steps", max(1, steps // 10), "--validation_steps", steps,
            "--checkpointing_steps", steps, *snapshots, "--num_inference_steps",
            cfg["sampling_steps"], "--seed", seed, "--report_to", "none", "--output_dir", dit, threads=threads,
        )  # fmt: skip
        reference = (["--reference_data_dir", src["reference"][1]] if src["reference"][0] == "--data_dir" else
                     ["--reference_dataset_name", cfg["dataset_name"], "--reference_split", cfg["validation_split"]])  # fmt: skip
        for step in curve:
            final = step == steps
            pipeline = dit if final else os.path.join(dit, "snapshots", f"step-{step}")
            folder = os.path.join(self.out, "eval_dit", tag, f"step-{step}")
            extra = []
            if final:
                extra = ["--loss_latents_dir", os.path.join(self.out, "latents_reference", slug(label)),
                         "--loss_noise_levels", cfg["loss_noise_levels"], "--trajectory_steps",
                         cfg["trajectory_steps"]]  # fmt: skip
            self.stages.script(
                f"eval_dit_{tag}_{step}", os.path.join(folder, "metrics.json"), "eval_dit.py", "--pipeline", pipeline,
                "--num_samples", cfg["fd_samples"], "--num_inference_steps", cfg["sampling_steps"],
                "--class_sampling", "balanced", "--seed", seed, "--feature_extractor",
                *[features[n] for n in FEATURES], *reference, "--num_reference", cfg["reference_crops"],
                "--resolution", res, "--stats_cache_dir", os.path.join(self.out, "reference_stats"), *extra,
                "--output_dir", folder, threads=threads,
            )  # fmt: skip

    def instrument(self, label):
        res = self.info[label]["resolution"]
        meta = read_json(self.out, "latents_train", slug(label), "metadata.json")
        if res not in self.instruments:
            self.instruments[res] = Instrument(self, res, meta["id2label"])
        return self.instruments[res]

    def diagnose(self, label, seeds, recipe=None, steps=None, curve=True):
        """Is this AE's generator (``recipe``, ``steps``) an instrument? Per seed: class accuracy, layout
        correlation and thumbnail FD of the final samples, the held-out loss's class gain (mean over noise levels);
        over seeds: the pooled class-accuracy test, and :func:`instrument_flags` (the FD curve's last interval
        in the ``domain`` space against the final FD's seed std)."""
        steps = steps or self.cfg["dit_steps"]
        instrument = self.instrument(label)
        per_seed = {}
        for seed in seeds:
            folder = os.path.join(self.out, "eval_dit", self.dit_tag(label, seed, recipe, steps), f"step-{steps}")
            row = instrument.measure(os.path.join(folder, "samples"))
            gain = read_json(folder, "metrics.json")["loss_per_noise_level"]["class_gain"]
            per_seed[seed] = {**row, "class_gain": float(np.mean(gain))}
        check = well_above_chance(sum(r["correct"] for r in per_seed.values()),
                                  sum(r["num_samples"] for r in per_seed.values()), instrument.num_classes)  # fmt: skip
        fd, fd_curve, _ = self.results(label, seeds, recipe, steps, curve)
        nan = float("nan")
        last_gain, noise = last_interval(fd_curve["domain"], seeds) if len(seeds) >= 2 else (nan, nan)
        layout = float(np.mean([r["layout_correlation"] for r in per_seed.values()]))
        flags = instrument_flags(check, layout, instrument.layout_ceiling, last_gain, noise)
        return {
            "per_seed": {str(s): r for s, r in per_seed.items()},
            "class_accuracy": check,
            "layout_correlation": layout,
            "layout_ceiling": instrument.layout_ceiling,
            "fd_thumbnail": float(np.mean([r["fd_thumbnail"] for r in per_seed.values()])),
            "class_gain": float(np.mean([r["class_gain"] for r in per_seed.values()])),
            "fd_last_interval_gain": last_gain,
            "fd_seed_std": noise,
            "flags": flags,
        }

    def results(self, label, seeds, recipe=None, steps=None, curve=True):
        """``(final FD {space: {seed: value}}, curve {space: {step: {seed: value}}}, loss {seed: ...})``; the
        curve has the final step only when the run was made with ``curve=False``."""
        steps = steps or self.cfg["dit_steps"]
        evaluated = self.curve_steps(steps) if curve else [steps]
        fd = {space: {} for space in FEATURES}
        curve = {space: {} for space in FEATURES}
        loss = {}
        for seed in seeds:
            for step in evaluated:
                m = read_json(self.out, "eval_dit", self.dit_tag(label, seed, recipe, steps), f"step-{step}",
                              "metrics.json")  # fmt: skip
                values = fd_values(m["metrics"])
                for space in FEATURES:
                    curve[space].setdefault(step, {})[seed] = values[space]
                    if step == steps:
                        fd[space][seed] = values[space]
                if step == steps:
                    loss[seed] = m["loss_per_noise_level"]
        return fd, curve, loss


class Instrument:
    """What a generator's samples say about the generator itself, against the reference crops: class accuracy (the
    domain classifier), per-class layout (:func:`layout_correlation`, against the data's own consistency between
    the reference crops and as many training crops), and the FD of 8x8 thumbnails (a space not pooled over
    space). Built once per resolution."""

    def __init__(self, bench, res, id2label):
        src, (features, _) = bench.data(res), bench.feature_spaces(res)
        folder = os.path.dirname(features["domain"])
        self.classifier = torch.jit.load(os.path.join(folder, "classifier_domain.pt")).eval()
        self.num_classes = len(id2label)
        index = {name: int(k) for k, name in id2label.items()}

        def labelled(directory, limit=None):
            items, classes = image_folder_items(directory)
            items = [(path, index[classes[k]]) for path, k in items if classes[k] in index]
            if limit is not None and len(items) > limit:
                keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:limit].tolist()
                items = [items[i] for i in sorted(keep)]
            return load_items(items, res)

        ref, ref_labels = labelled(src["test_dir"])
        self.reference_means = class_position_means(ref, ref_labels, self.num_classes)
        train, train_labels = labelled(src["train_dir"], limit=len(ref))
        self.layout_ceiling = layout_correlation(class_position_means(train, train_labels, self.num_classes),
                                                 self.reference_means)  # fmt: skip
        thumbs = thumbnail_features(ref)
        self.reference_thumbs = (thumbs.mean(0), np.cov(thumbs, rowvar=False))

    def measure(self, samples_dir):
        from diffusability_hf.metrics import frechet_distance

        pixels, labels = load_samples(samples_dir)
        accuracy = class_accuracy(self.classifier, pixels, labels)
        thumbs = thumbnail_features(pixels)
        return {
            "class_accuracy": accuracy,
            "correct": int(round(accuracy * len(labels))),
            "num_samples": len(labels),
            "layout_correlation": layout_correlation(
                class_position_means(pixels, labels, self.num_classes), self.reference_means
            ),  # fmt: skip
            "fd_thumbnail": frechet_distance(thumbs.mean(0), np.cov(thumbs, rowvar=False), *self.reference_thumbs),
        }

"""Method classes of the GAN family (registered in `dpsynth.methods`).

All three own their mechanism (`own_mechanism = True`): `plan_private` calibrates the
ledger event before anything is written, `train_private` runs exactly it, checkpointing
through the stage's `Checkpointing` (so `finetune --resume` works for all three). Only the
generator leaves `train_private`; discriminators live in memory and in the stage's
checkpoints, which are deleted when the stage completes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...errors import BadInput
from ..base import Method, PrivatePlan, Trained
from ..registry import register_method
from ...privacy.events import ShardGaussianEvent
from ...privacy.plans import (applied_noise_std, calibrate_private_optimizer, calibrate_shard_gaussian,
                              private_optimizer_events, resolve_feedback_clip)
from .dp_gan import DPGANSchedule, train_dp_gan
from .gs_wgan import applied_noise_multiplier, train_gs_wgan
from .models import ConditionalGenerator, GANConfig

STAGE = "finetune"


def _positive(name: str, value: Any, integer: bool = False, zero_ok: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (value < 0 if zero_ok else value <= 0):
        kind = "an integer" if integer else "a number"
        raise BadInput(f"`train_opts` {name}={value!r} must be {kind} {'>= 0' if zero_ok else '> 0'}")


class GANMethod(Method):
    config_class, model_class = GANConfig, ConditionalGenerator
    own_mechanism = True
    adapts_to_size = False  # GS-WGAN's batch is per discriminator shard; DP-GAN's schedule is DP-SGD's
    pretrain_defaults = {"epochs": 1, "batch_size": 64, "lr": 2e-4}

    def per_sample_loss(self, *_args):  # never DP-SGD on a generator loss
        raise NotImplementedError(f"{self.name} trains with its own mechanism")

    def check_generator(self, generator, **_shape_and_opts) -> None:
        return None  # the generator never sees sensitive data; the trainers check their discriminators


class DPGAN(GANMethod):
    """DP-SGD on the discriminator. Defaults follow DPImageBench's DPGAN configs
    (configs/DPGAN/fmnist_28_eps{1.0,10.0}.yaml: d_lr 5e-4, g_lr 2e-4, Adam beta1 0,
    5 discriminator updates per generator update, EMA 0.999) except the clip (1.0 here:
    our fake term is clipped to the same norm, so the scale only matters relative to the
    noise) and a CPU-sized batch/epochs; recipes set the published 4096 x 150 epochs."""

    name = "dp-gan"
    adapts_to_size = True  # the discriminator's DP-SGD schedule (DPGANSchedule.dpsgd)
    description = "DP-GAN: DP-SGD on a conditional discriminator, generator trained through it"
    finetune_defaults = {"epochs": 1, "batch_size": 256, "clip": 1.0, "lr": 5e-4, "grad_sample_mode": "vmap",
                         "ema": 0.999, "private_optimizer": "dpsgd", "feedback_clip": None,
                         "train_opts": {"n_critic": 5, "g_lr": 2e-4, "beta1": 0.0, "recon_weight": 0.0}}

    def _schedule(self, dataset_size: int, opts) -> DPGANSchedule:
        t = opts.train_opts
        _positive("n_critic", t["n_critic"], integer=True)
        _positive("g_lr", t["g_lr"])
        _positive("recon_weight", t["recon_weight"], zero_ok=True)
        if not (isinstance(t["beta1"], (int, float)) and 0 <= t["beta1"] < 1):
            raise BadInput(f"`train_opts` beta1={t['beta1']!r} must be in [0, 1)")
        if opts.grad_sample_mode != "vmap":
            # vmap computes each example on its own, so the private model never sees a fake row;
            # opacus' hooks would also capture the fake term's forward (see dp_gan.py)
            raise BadInput(f"grad_sample_mode={opts.grad_sample_mode}: {self.name} computes per-example "
                           f"gradients with vmap only; drop `grad_sample_mode` or pass vmap")
        return DPGANSchedule(dataset_size=dataset_size, batch_size=opts.batch_size, epochs=opts.epochs,
                             n_critic=t["n_critic"])

    def plan_private(self, *, dataset_size, opts, spent, eps, delta) -> PrivatePlan:
        schedule = self._schedule(dataset_size, opts)
        q, steps, clip = schedule.sample_rate, schedule.discriminator_steps, opts.clip
        settings = {"sample_rate": q, "discriminator_steps": steps, "generator_steps": schedule.generator_steps}
        # The private optimizer's own events (EFSGD adds a non-subsampled one: training/efsgd.py).
        kind = opts.private_optimizer
        feedback_clip = resolve_feedback_clip(kind, opts.feedback_clip, clip=clip, sample_rate=q)
        sigma = calibrate_private_optimizer(kind, spent, eps, delta, sample_rate=q, steps=steps, clip=clip,
                                            feedback_clip=feedback_clip, stage=STAGE)
        events = private_optimizer_events(kind, STAGE, noise_multiplier=sigma, sample_rate=q, steps=steps, clip=clip,
                                          feedback_clip=feedback_clip)
        if kind == "efsgd":
            settings.update(feedback_clip=feedback_clip, noise_std=applied_noise_std(sigma, clip))
        else:
            events = [replace(events[-1], note=f"{self.name}: DP-SGD discriminator steps (per-sample clip {clip:g}); "
                                               f"generator steps read no sensitive data")]
            settings.update(noise_std=sigma * clip)
        events = tuple(events)
        return PrivatePlan(events=events, settings={"noise_multiplier": sigma, "dataset_size": dataset_size,
                                                    **settings})

    def private_steps(self, plan: PrivatePlan) -> int:
        return int(plan.settings["discriminator_steps"])  # the accounted (noisy) steps

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints) -> Trained:
        schedule = self._schedule(plan.settings["dataset_size"], opts)  # the declared N, as planned
        if schedule.discriminator_steps != plan.settings["discriminator_steps"]:
            raise RuntimeError("DP-GAN schedule differs from the planned event")
        trained, _counts = train_dp_gan(
            generator, images, labels, schedule=schedule, noise_multiplier=plan.settings["noise_multiplier"],
            opts=opts.replace(feedback_clip=plan.settings.get("feedback_clip")), device=device,
            progress=progress, phase=f"finetune ({self.name}, DP discriminator)", checkpoints=checkpoints)
        return Trained(trained)


class EFSGDGAN(DPGAN):
    """EFSGD (Ma & Zhang, arXiv 2601.15061): DP-GAN with error-feedback DP-SGD on the
    discriminator, an L2 reconstruction loss and noise injection in the generator's
    upsampling path. Only the abstract is available here; our reading (docs/DECISIONS.md):
    the reconstruction loss is an auxiliary decoder head of the discriminator trained on
    real images INSIDE the clipped per-sample loss (every term touching real data is
    private), weight 1; noise injection is StyleGAN's per-pixel noise with a learned
    per-channel scale after each upsampling block (generator arch noise_injection=true,
    set by default through `arch_defaults`)."""

    name = "efsgd-gan"
    description = "EFSGD-GAN: DP-GAN + error-feedback DP-SGD, reconstruction loss, noise injection"
    finetune_defaults = {**DPGAN.finetune_defaults, "private_optimizer": "efsgd",
                         "train_opts": {**DPGAN.finetune_defaults["train_opts"], "recon_weight": 1.0}}
    arch_defaults = {"noise_injection": True, "reconstruction": True}

    def __init__(self, arch: dict | None = None):
        super().__init__({**self.arch_defaults, **(arch or {})})


class GSWGAN(GANMethod):
    """Defaults follow GS-WGAN's paper/code (source/config.py) and DPImageBench's
    configs/GS-WGAN/fmnist_28_eps*.yaml: 1000 discriminators, batch 32, 20000 generator
    iterations, 5 critic iterations, 2000 warm-up iterations, GP weight 10, epsilon
    penalty 1e-3, Adam 1e-4 (0.5, 0.9), clip C = 1; EMA 0.999 of the generator."""

    name = "gs-wgan"
    description = "GS-WGAN: sharded discriminators, per-sample clipped and noised gradients into the generator"
    finetune_defaults = {"batch_size": 32, "clip": 1.0, "lr": 1e-4, "ema": 0.999,
                         "train_opts": {"discriminators": 1000, "iterations": 20000, "critic_iters": 5,
                                        "warmup_iters": 2000, "gp_weight": 10.0, "eps_weight": 1e-3,
                                        "beta1": 0.5, "beta2": 0.9}}

    def _check(self, dataset_size: int, opts: dict) -> dict:
        t = opts["train_opts"]
        for key in ("discriminators", "iterations", "critic_iters"):
            _positive(key, t[key], integer=True)
        _positive("warmup_iters", t["warmup_iters"], integer=True, zero_ok=True)
        for key in ("gp_weight", "eps_weight"):
            _positive(key, t[key], zero_ok=True)
        for key in ("beta1", "beta2"):
            if not (isinstance(t[key], (int, float)) and 0 <= t[key] < 1):
                raise BadInput(f"`train_opts` {key}={t[key]!r} must be in [0, 1)")
        if t["discriminators"] > dataset_size:
            raise BadInput(f"`train_opts` discriminators={t['discriminators']} exceeds the dataset size {dataset_size}")
        return t

    def plan_private(self, *, dataset_size, opts, spent, eps, delta) -> PrivatePlan:
        t = self._check(dataset_size, opts)
        shards, steps, batch = t["discriminators"], t["iterations"], opts["batch_size"]
        # Shard-Gaussian accounting (gs_wgan.py): each image is touched by K ~ Bin(steps, 1/shards)
        # unamplified Gaussian releases; no Poisson amplification by 1/shards.
        sigma_eff = calibrate_shard_gaussian(spent, eps, delta, shards=shards, steps=steps, stage=STAGE)
        applied = applied_noise_multiplier(sigma_eff, batch)
        event = ShardGaussianEvent(
            stage=STAGE, noise_multiplier=sigma_eff, shards=shards, steps=steps,
            note=f"gs-wgan: B={batch} per-fake-sample gradients clipped to C={opts['clip']:g}, "
                 f"noise std {applied:.4g}*C per coordinate; L2 sensitivity 2C*sqrt(B); the image's shard "
                 f"(1 of {shards}) is fixed, each step's shard index is treated as public")
        return PrivatePlan(events=(event,), settings={
            "noise_multiplier": sigma_eff, "noise_multiplier_applied": applied, "noise_std": applied * opts["clip"],
            "shards": shards, "generator_steps": steps, "l2_sensitivity_per_clip": 2.0 * batch ** 0.5})

    def private_steps(self, plan: PrivatePlan) -> int:
        return int(plan.settings["generator_steps"])  # one sanitized release per generator step

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints) -> Trained:
        t = self._check(len(images), opts)
        trained, _counts = train_gs_wgan(
            generator, images, labels, discriminators=t["discriminators"], iterations=plan.settings["generator_steps"],
            batch_size=opts.batch_size, clip=opts.clip,
            noise_multiplier_applied=plan.settings["noise_multiplier_applied"], lr=opts.lr,
            betas=(t["beta1"], t["beta2"]), critic_iters=t["critic_iters"], warmup_iters=t["warmup_iters"],
            gp_weight=t["gp_weight"], eps_weight=t["eps_weight"], ema=opts.ema, device=device, progress=progress,
            checkpoints=checkpoints)
        return Trained(trained)


for _cls in (DPGAN, GSWGAN, EFSGDGAN):
    register_method(_cls)

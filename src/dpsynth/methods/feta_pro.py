"""FETA-Pro (Li, Gong et al., arXiv 2601.06368, 2026): DP-FETA with a second, frequency-domain
warm-up stage before DP-SGD.

Three mechanisms read the sensitive set, each a ledger event written before its output exists:
1. DP-FETA's central images ("time": spatial features): PoissonGaussianEvent(sigma_time, q, queries);
2. the frequency release ("freq"): ONE Gaussian release of the labelled random-Fourier-feature
   embedding sum over all N images (dp-merf's mechanism, mechanisms/embedding_release.py: L2
   sensitivity 1 for add/remove, which is the authors' `sigma_sensitivity_ratio: 0.5` of the
   replace-one 2/N on the mean): GaussianEvent(sigma_freq);
3. DP-SGD fine-tuning (the diffusion family's finetune), calibrated on what 1 and 2 spent.
Both warm-up events are written by the pretrain stage before either release runs. Everything
else is post-processing: an auxiliary generator (dp-merf's) is fitted to the noisy embedding, and
its labelled samples are a second warm-up set for the diffusion model, after the central images
(`time_freq`, the authors' default) or in another order.

Defaults are the authors' Fashion-MNIST eps=10 settings (2019ChenGong/Feta-Pro, configs/DP-FETA-Pro:
sigma_time 5, sigma_freq 7.4, d_rff 10,000, rff_sigma 105 = bandwidth^2, generator 5 epochs of
batch 100 at lr 0.01 decayed 0.9 per epoch, 60,000 auxiliary images, warm-up 1000 epochs of batch
50 on the central images then 10 of batch 256 on the auxiliary images). The auxiliary generator is
dpsynth's small conditional generator, not the authors' BigGAN-style one.

`aux_opts: {kind: gmm}` (dpsynth's variant, not the authors') replaces the RFF release by dp-gmm's
2 + lloyd_iterations moment releases (methods/dp_gmm.py), each of noise multiplier
freq_sigma * sqrt(2 + lloyd_iterations): Gaussian releases compose exactly (sqrt(k)/sigma_each-GDP),
so they cost what one release of freq_sigma costs. The auxiliary images are the mixture's samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import BadInput
from ..mechanisms.embedding_release import noisy_sum
from ..mechanisms.secret_noise import reseed_global_rng
from ..privacy.events import GaussianEvent
from ..progress import no_progress
from ..models.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from ..validation import check_choice, check_positive
from .base import PrivatePlan
from .diffusion import DPFETA, WarmupRelease, WarmupSet, check_within_target
from .mean_embedding.features import RandomFourierFeatures
from .mean_embedding.generator import EmbeddingGenerator, EmbeddingGeneratorConfig
from .mean_embedding.methods import fit_to_release
from .dp_gmm import SENSITIVITY as GMM_SENSITIVITY, checked_fit_settings, fit_mixture, release_names
from .registry import register_method

# Which releases each order uses and the order of the warm-up sets ("mix": one concatenated set).
WARMUP_ORDERS = {"time_freq": ("central", "auxiliary"), "freq_time": ("auxiliary", "central"),
                 "mix": ("mix",), "time": ("central",), "freq": ("auxiliary",)}

AUX_DEFAULTS: dict[str, Any] = {
    "features": 10000, "bandwidth": 10.25, "count_weight": 0.1,   # the release
    "epochs": 5, "batch_size": 100, "lr": 0.01, "lr_decay": 0.9,  # the generator's fit (post-processing)
    "images": 60000,                                              # auxiliary warm-up images
    "latent_dim": 32, "hidden": 256, "width": 16,                 # the generator (EmbeddingGeneratorConfig)
}
# `aux_opts: {kind: gmm}`: dp-gmm's mixture (its recipe's settings) as the auxiliary generator.
GMM_AUX_DEFAULTS: dict[str, Any] = {
    "components": 8, "rank": 10, "lloyd_iterations": 3, "clip": 0.5, "centred_clip": 0.32,  # dp-gmm's fit
    "images": 60000,                                                                        # auxiliary images
}
AUX_KINDS = {"rff": AUX_DEFAULTS, "gmm": GMM_AUX_DEFAULTS}
FREQ_NOTE = ("feta-pro: frequency release, one noisy sum of labelled random-Fourier-feature embeddings over all "
             "images; L2 sensitivity 1: each image adds (a*phi(x) (x) onehot(y), b*onehot(y)), a^2+b^2<1, ||phi||=1")


def _aux_value(key: str, value: Any) -> Any:
    """One `aux_opts` setting, checked. The message says "key epochs: 0", not "epochs=0", which
    the CLI would read as pretrain's own --epochs."""
    integer = key in ("features", "epochs", "batch_size", "images", "latent_dim", "hidden", "width", "components",
                      "rank")
    kind = "an integer" if integer else "a number"
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
          and (not integer or isinstance(value, int)))
    if not ok:
        raise BadInput(f"`aux_opts` key {key}: {value!r} is not allowed; it must be {kind} > 0")
    if key == "features" and value % 2:
        raise BadInput(f"`aux_opts` key features: {value!r} must be even (cos and sin pairs)")
    if key == "lr_decay" and value > 1:
        raise BadInput(f"`aux_opts` key lr_decay: {value!r} must be in (0, 1] (1: constant learning rate)")
    if key == "count_weight" and value >= 1:
        raise BadInput(f"`aux_opts` key count_weight: {value!r} must be in (0, 1)")
    return int(value) if integer else float(value)


class FETAPro(DPFETA):
    name = "feta-pro"
    description = ("FETA-Pro: warm-up on DP central images, then on an auxiliary generator fitted to one DP "
                   "random-Fourier-feature release, then DP-SGD")
    warmup_summary = "DP central images + one DP RFF release (auxiliary generator)"
    # FETA-Pro's central-image warm-up: n_epochs_time 1000 at batch_size_time 50, Adam 3e-4.
    pretrain_defaults = {"epochs": 1000, "batch_size": 50, "lr": 3e-4}
    warmup_defaults = {"freq_sigma": 7.4, "warmup_order": "time_freq", "freq_epochs": 10, "freq_batch_size": 256,
                       "aux_opts": AUX_DEFAULTS}

    def warmup_options(self, given: dict) -> dict:
        o = super().warmup_options({k: v for k, v in given.items() if k != "aux_opts"})
        check_choice("warmup_order", o["warmup_order"], tuple(WARMUP_ORDERS))
        check_positive("freq_sigma", o["freq_sigma"])
        check_positive("freq_epochs", o["freq_epochs"], integer=True)
        check_positive("freq_batch_size", o["freq_batch_size"], integer=True)
        aux = dict(given.get("aux_opts") or {})
        kind = aux.pop("kind", "rff")
        if kind not in AUX_KINDS:
            raise BadInput(f"`aux_opts` key kind: {kind!r} is not allowed; it must be one of {', '.join(AUX_KINDS)}")
        defaults = AUX_KINDS[kind]
        unknown = sorted(set(aux) - set(defaults))
        if unknown:
            raise BadInput(f"`aux_opts` key {unknown[0]!r} is not a setting of feta-pro's {kind} auxiliary generator; "
                           f"allowed: kind, {', '.join(defaults)}")
        if kind == "gmm":  # dp-gmm's own checks (lloyd_iterations may be 0; clips are shares of sqrt(D))
            merged = checked_fit_settings({**defaults, **aux}, "`aux_opts`")
            o["aux_opts"] = {"kind": kind, **{k: merged[k] if k in ("lloyd_iterations", "clip", "centred_clip")
                                              else _aux_value(k, merged[k]) for k in defaults}}
        else:
            o["aux_opts"] = {"kind": kind, **{k: _aux_value(k, aux.get(k, v)) for k, v in defaults.items()}}
        return o

    def plan_warmup(self, *, dataset_size: int, sigma: float, queries: int, batch: int, spent: list,
                    delta: float, target: float | None, epochs: int, batch_size: int, augment: bool,
                    options: dict | None = None) -> PrivatePlan:
        """The warm-up releases the order needs, in ledger order: central images, then the
        frequency release; refused (nothing written) when they would pass `target`."""
        o = self.warmup_options(options or {})
        uses = set(WARMUP_ORDERS[o["warmup_order"]])
        if "mix" in uses:
            uses = {"central", "auxiliary"}
        if dataset_size < 1:
            raise BadInput(f"sensitive dataset is empty (size {dataset_size})")
        events, settings = [], {"warmup_order": o["warmup_order"], "dataset_size": dataset_size}
        if "central" in uses:
            central = self.central_event(dataset_size=dataset_size, sigma=sigma, queries=queries, batch=batch,
                                         note="feta-pro: central images (noisy class means)")
            events.append(central)
            settings.update(central_sigma=float(sigma), central_queries=int(queries),
                            central_sample_rate=central.sample_rate, central_epochs=int(epochs),
                            central_batch_size=int(batch_size), augment=bool(augment))
        if "auxiliary" in uses:
            settings.update(freq_sigma=float(o["freq_sigma"]), freq_epochs=o["freq_epochs"],
                            freq_batch_size=o["freq_batch_size"], aux_opts=o["aux_opts"], l2_sensitivity=1.0)
            if o["aux_opts"]["kind"] == "gmm":
                names = release_names(o["aux_opts"]["lloyd_iterations"])
                each = float(o["freq_sigma"]) * math.sqrt(len(names))  # k of them compose to one of freq_sigma
                events.extend(GaussianEvent(stage="pretrain", noise_multiplier=each,
                                            note=f"feta-pro: auxiliary dp-gmm {what}; {GMM_SENSITIVITY}")
                              for what in names)
                settings.update(gmm_release_sigma=each, gmm_releases=len(names))
            else:
                events.append(GaussianEvent(stage="pretrain", noise_multiplier=float(o["freq_sigma"]), note=FREQ_NOTE))
        check_within_target(spent, events, delta, target,
                            f"feta-pro's warm-up releases (central_sigma={sigma:g}, freq_sigma={o['freq_sigma']:g})",
                            {**({"central_sigma": float(sigma)} if "central" in uses else {}),
                             **({"freq_sigma": float(o["freq_sigma"])} if "auxiliary" in uses else {})})
        return PrivatePlan(events=tuple(events), settings=settings)

    def release_warmup(self, images, labels, num_classes: int, *, plan: PrivatePlan, device=None,
                       progress=no_progress) -> WarmupRelease:
        """Run exactly the planned releases (both already in the ledger, before either runs),
        then the post-processing: the auxiliary generator and its images, the sets in order."""
        s = plan.settings
        device = device or torch.device("cpu")
        central = self.release_central(images, labels, num_classes, plan=plan) if "central_sigma" in s else None
        if "freq_sigma" in s and s["aux_opts"]["kind"] == "gmm":
            auxiliary, mixture = self._gmm_auxiliary(images, labels, num_classes, s, device, progress)
            return WarmupRelease(sets=self._ordered_sets(s, central, auxiliary), central=central,
                                 auxiliary=mixture.cpu())
        release = None
        if "freq_sigma" in s:
            aux = s["aux_opts"]
            # The embedding's noise comes from the global RNG: reseeded from OS entropy here, as the
            # stage did, whatever ran in between (the frequencies need not be secret, the noise must).
            reseed_global_rng()
            n, c, h, w = images.shape
            fmap = RandomFourierFeatures(c * h * w, aux["features"], [aux["bandwidth"]]).to(device)
            done = [0]

            def on_rows(count: int) -> None:
                done[0] += count
                progress("warm-up: frequency release (embedding)", done[0], n)

            release = noisy_sum(fmap, images, labels, num_classes, noise_multiplier=s["freq_sigma"],
                                count_weight=aux["count_weight"], device=device, on_rows=on_rows)
            if done[0] != n:  # the accounted mechanism embeds every image
                raise AssertionError(f"embedded {done[0]} of {n} images")
        # ---- post-processing only from here on -------------------------------------------------
        generator, auxiliary = None, None
        if release is not None:
            aux = s["aux_opts"]
            generator = EmbeddingGenerator(EmbeddingGeneratorConfig(
                resolution=images.shape[-1], channels=images.shape[1], num_classes=num_classes,
                latent_dim=aux["latent_dim"], hidden=aux["hidden"], width=aux["width"])).to(device)
            fit_to_release(generator, fmap, release, s["dataset_size"], epochs=aux["epochs"],
                           batch_size=aux["batch_size"], lr=aux["lr"], lr_decay=aux["lr_decay"], device=device,
                           progress=progress, phase="warm-up: auxiliary generator (RFF)")
            aux_labels = torch.arange(aux["images"]) % num_classes  # class-balanced, as generate makes them
            rng = torch.Generator().manual_seed(0)  # sampling a DP generator: post-processing
            chunks = [generator.sample(aux_labels[i:i + 1000], generator=rng) for i in range(0, len(aux_labels), 1000)]
            auxiliary = (torch.cat(chunks).cpu(), aux_labels)
        return WarmupRelease(sets=self._ordered_sets(s, central, auxiliary), central=central,
                             auxiliary=None if generator is None else generator.cpu())

    @staticmethod
    def _gmm_auxiliary(images, labels, num_classes: int, s: dict, device, progress):
        """dp-gmm's releases (in the ledger already), then its samples as the auxiliary set."""
        aux = s["aux_opts"]
        reseed_global_rng()  # the centroid draws and the releases' noise: fresh OS entropy, as the stage's
        _, c, h, w = images.shape
        if h != w:
            raise BadInput(f"feta-pro's gmm auxiliary needs square images, not {h}x{w}")
        mixture = GaussianMixture(GaussianMixtureConfig(resolution=h, channels=c, num_classes=num_classes,
                                                        components=aux["components"], rank=aux["rank"]))
        fit_mixture(mixture.to(device), images, labels, noise_multiplier=s["gmm_release_sigma"],
                    lloyd_iterations=aux["lloyd_iterations"], clip=aux["clip"], centred_clip=aux["centred_clip"],
                    device=device, progress=progress, phase="warm-up: auxiliary dp-gmm releases")
        # ---- post-processing only from here on -------------------------------------------------
        aux_labels = torch.arange(aux["images"]) % num_classes  # class-balanced, as generate makes them
        rng = torch.Generator().manual_seed(0)
        chunks = [mixture.sample(aux_labels[i:i + 1000], generator=rng) for i in range(0, len(aux_labels), 1000)]
        return (torch.cat(chunks).cpu(), aux_labels), mixture

    @staticmethod
    def _ordered_sets(s: dict, central, auxiliary) -> tuple[WarmupSet, ...]:
        def central_set():
            return WarmupSet("central images", *central, s["central_epochs"], s["central_batch_size"], s["augment"])

        def auxiliary_set():
            # The authors augment only the few central images; the auxiliary set is large.
            return WarmupSet("auxiliary images", *auxiliary, s["freq_epochs"], s["freq_batch_size"], False)

        def mixed_set():
            x = torch.cat([central[0], auxiliary[0]])
            y = torch.cat([central[1], auxiliary[1]])
            return WarmupSet("central + auxiliary images", x, y, s["freq_epochs"], s["freq_batch_size"], False)

        build = {"central": central_set, "auxiliary": auxiliary_set, "mix": mixed_set}
        return tuple(build[part]() for part in WARMUP_ORDERS[s["warmup_order"]])


register_method(FETAPro)

"""What the latent methods share: the latent diffusion generator, its two-phase public
pretraining (autoencoder, then the diffusion model on its latents), the sensitive set encoded
once before DP-SGD, and the freezing of everything DP-SGD must not train."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ...errors import BadInput
from ...models.ldm import LatentDiffusion, LatentDiffusionConfig
from ...progress import Progress
from ...training.checkpoint import Checkpointing
from ...training.options import FinetuneOptions
from ..base import Method, PrivatePlan, Trained


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Parameter]) -> nn.Module:
    """requires_grad=False everywhere except `trainable`: opacus then hooks, computes and
    stores nothing for the frozen parameters, and the optimizer never moves them."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def check_train_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInput(f"`train_opts` {name}={value!r} must be an integer >= {minimum}")
    return value


def check_train_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BadInput(f"`train_opts` {name}={value!r} must be a number > 0")
    return float(value)


class LatentDiffusionMethod(Method):
    """DP-SGD on part of a latent diffusion model pretrained on public data.

    Defaults from DPImageBench (configs/DP-LDM/fmnist_28_eps10.0.yaml and the LDM configs it
    names, models/DP_LDM/configs/{autoencoder,latent-diffusion}/28*.yaml): autoencoder ch 128,
    ch_mult [1, 2], z 3, 4 epochs at batch 64, lr 64 x 1e-6 (LDM's scale_lr); latent U-Net
    width 64, ch_mult [1, 2], attention at 1 and 2, 160 epochs at batch 1024, lr 1024 x 1e-6;
    DP-SGD batch 4096 (physical 512), clip 1e-3. Epochs default to CPU-sized values
    (pretrain 25, finetune 2); recipes set the published ones. Learning rates use Adam at a
    constant rate (dpsynth's loop has no scheduler): see each subclass.
    """

    uses_pretraining = True
    config_class, model_class = LatentDiffusionConfig, LatentDiffusion
    pretrain_defaults = {"epochs": 25, "batch_size": 1024, "lr": 1.024e-3,
                         "train_opts": {"ae_epochs": 4, "ae_batch_size": 64, "ae_lr": 6.4e-5}}
    sample_defaults = {"steps": 200, "guidance": 0.0}

    # ---- pretrain: public data only ---------------------------------------------------------------
    def pretrain_public(self, generator: LatentDiffusion, images, labels, *, epochs, batch_size, lr, seed,
                        train_opts, progress: Progress) -> dict:
        from ...training.dpsgd import train_nonprivate

        ae_epochs = check_train_int("ae_epochs", train_opts["ae_epochs"], 1)
        ae_batch = check_train_int("ae_batch_size", train_opts["ae_batch_size"], 1)
        ae_lr = check_train_number("ae_lr", train_opts["ae_lr"])
        # 1. the autoencoder alone
        freeze_all_but(generator, generator.autoencoder.parameters())
        train_nonprivate(generator, images, labels, lambda m, x, _y: m.autoencoder_loss(x), epochs=ae_epochs,
                         batch_size=ae_batch, lr=ae_lr, seed=seed, progress=progress,
                         phase="pretrain autoencoder (public)")
        # 2. the diffusion model (U-Net and class embedder) on the frozen autoencoder's latents
        freeze_all_but(generator, [*generator.unet.parameters(), *generator.class_embed.parameters()])
        moments = generator.encode_moments(images)
        scale = generator.set_latent_scale(moments)
        train_nonprivate(generator, moments, labels, self.per_sample_loss, epochs=epochs, batch_size=batch_size,
                         lr=lr, seed=seed, progress=progress, phase="pretrain latent diffusion (public)")
        freeze_all_but(generator, generator.parameters())
        return {"latent_scale": scale, "latent_shape": list(moments.shape[1:])}

    # ---- finetune: DP-SGD on the trainable part ---------------------------------------------------
    def private_parameters(self, generator: LatentDiffusion, opts: FinetuneOptions) -> list[nn.Parameter]:
        raise NotImplementedError

    def prepare_private(self, generator: nn.Module, opts: FinetuneOptions) -> nn.Module:
        return freeze_all_but(generator, self.private_parameters(generator, opts))

    def train_private(self, generator: LatentDiffusion, images, labels, *, opts: FinetuneOptions,
                      plan: PrivatePlan, device: torch.device, progress: Progress,
                      checkpoints: Checkpointing) -> Trained:
        # The frozen encoder is a fixed public map applied to each image on its own: encoding the
        # set once gives every row the same moments its every DP step would compute again.
        moments = generator.to(device).encode_moments(images)
        return super().train_private(generator, moments, labels, opts=opts, plan=plan, device=device,
                                     progress=progress, checkpoints=checkpoints)


"""DP-SGD with opacus: Poisson sampling, per-sample clipping, Gaussian noise.

Accounting is NOT done here: the caller computes the noise multiplier with the run's
ledger (`dpsynth.privacy`) and writes the event before calling `train_dp`. This module
only guarantees that the mechanism it runs is the one the event describes: Poisson
sampling at exactly `sample_rate`, exactly `steps` noisy steps, clipping at `clip`.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Callable

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import BadInput
from ..progress import Progress, no_progress
from . import distributed
from .bookkeeping import BookKeepingClipping
from .checkpoint import Checkpointing, capture_state, restore_model_and_optimizer, restore_rng
from .device import prefers_channels_last
from .dp_guards import check_poisson_sampler
from .memory import HeapTrimmer
from ..privacy.plans import DPSGDPlan, check_private_optimizer
from .options import FinetuneOptions, check_combination, check_values
from .private_optimizer import make_private_optimizer

NO_CHECKPOINTS = Checkpointing()
CHANNELS_LAST_MODES = ("bk", "vmap")  # grad_sample_modes that train in channels_last on the GPU


def check_secure_available(secure: bool, device: torch.device | None = None) -> None:
    """opacus' secure_mode needs torchcsprng, and its CSPRNG is a CPU generator, which cannot draw
    noise on a GPU; say so before any privacy event is written."""
    if secure and importlib.util.find_spec("torchcsprng") is None:
        raise BadInput("`secure` needs the torchcsprng package (opacus secure_mode), which is not installed; "
                       "install it or drop `secure`")
    if secure and device is not None and device.type != "cpu":
        raise BadInput(f"`secure` draws sampling and noise from opacus' CSPRNG, a CPU generator, so it cannot "
                       f"train on device {device}; use device cpu or drop `secure`")


def check_dp_compatible(model: nn.Module) -> None:
    """Fail loudly if a layer would break per-sample privacy (e.g. BatchNorm mixes samples)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise BadInput(f"model is not DP-SGD compatible: {errors[0]}")


class ExponentialMovingAverage:
    """EMA of the weights after each noisy step (post-processing: no privacy cost). The
    decay ramps up as min(rate, (1+t)/(10+t)) so that short runs are not dominated by the
    initial weights."""

    def __init__(self, model: nn.Module, rate: float):
        if not (0.0 < rate < 1.0):
            raise BadInput(f"ema={rate!r} must be between 0 and 1 (e.g. 0.999)")
        self.rate, self.updates = rate, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.rate, (1.0 + self.updates) / (10.0 + self.updates))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return self.shadow


def with_precision(per_sample_loss: Callable, device: torch.device, precision: str | None) -> Callable:
    """The per-sample loss with its FORWARD under bf16 autocast ("bf16"; "fp32"/None: unchanged).
    The losses come back in fp32 and every caller runs the backward, the per-example norms, the
    clipping, the clipped sums and the noise outside it, in fp32 (the parameters stay fp32):
    autocast there would cast even fp32 products to bf16."""
    if precision != "bf16":  # values checked by options.check_values
        return per_sample_loss

    def loss(model, x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = per_sample_loss(model, x, y)
        return losses.float()

    return loss


class _Float32GradSampleModule(GradSampleModule):
    """opacus' hooks, with each layer's input and output gradient in fp32 before its per-example
    gradient is formed: under bf16 autocast they arrive in bf16, and the per-example gradients,
    their norms and clipped sum must be fp32 (a no-op otherwise)."""

    def rearrange_grad_samples(self, **kwargs):
        activations, backprops = super().rearrange_grad_samples(**kwargs)
        return [_float32(a) for a in activations], _float32(backprops)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class PerExampleGradients:
    """Leaves on each trainable parameter `p.grad_sample`: one gradient per EXAMPLE of the
    loss averaged over `multiplicity` draws of the model's internal randomness.

    - "hooks" / "functorch": opacus' GradSampleModule on the batch repeated K times (rows
      grouped example by example), then the K rows of each example are averaged;
    - "vmap": torch.func, vmap over examples of the gradient of the K-draw mean, so memory
      holds B per-example gradients, never B*K.
    The optimizer (opacus DPOptimizer) then clips, sums and noises them.
    """

    def __init__(self, model: nn.Module, per_sample_loss, mode: str, multiplicity: int = 1):
        if mode not in ("hooks", "functorch", "vmap"):
            raise BadInput(f"per-example gradient mode {mode!r} is unknown; choose hooks, functorch or vmap")
        self.model, self.loss, self.mode, self.k = model, per_sample_loss, mode, multiplicity
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if mode == "vmap":
            self.module = model
            self._per_example = self._build_vmap()
        else:
            self.module = _Float32GradSampleModule(model, batch_first=True, loss_reduction="mean",
                                                   force_functorch=mode == "functorch")

    def _build_vmap(self):
        from torch.func import functional_call, grad, vmap

        model, loss, k = self.model, self.loss, self.k
        buffers = dict(model.named_buffers())

        class _Bound(nn.Module):  # lets per_sample_loss call "model(x, y)" on functional params
            def __init__(self, params):
                super().__init__()
                self._params = params

            def forward(self, *args):
                return functional_call(model, (self._params, buffers), args)

        def example_loss(params, x1, y1):
            xs = x1.unsqueeze(0).expand(k, *x1.shape)
            ys = y1.unsqueeze(0).expand(k, *y1.shape)
            losses = loss(_Bound(params), xs, ys)
            return losses.mean(), losses.detach().mean()

        return vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example gradients for this chunk; returns the per-example (K-mean) losses."""
        if self.mode == "vmap":
            params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
            grads, losses = self._per_example(params, x, y)
            for n, p in self.model.named_parameters():
                if n in grads:
                    p.grad_sample = grads[n]
            return losses
        k = self.k
        xs, ys = (x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)) if k > 1 else (x, y)
        losses = self.loss(self.module, xs, ys)
        _check_loss_shape(losses, len(xs))
        losses.mean().backward()  # opacus scales each row's grad_sample back to d(loss_row)
        if k > 1:
            for p in self.trainable:
                p.grad_sample = p.grad_sample.reshape(len(x), k, *p.shape).mean(dim=1)
        return losses.detach().reshape(len(x), k).mean(dim=1)


def train_dp(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
             plan: DPSGDPlan, noise_multiplier: float, opts: FinetuneOptions,
             ema: ExponentialMovingAverage | None = None, progress: Progress = no_progress,
             phase: str = "finetune (DP-SGD)", checkpoints: Checkpointing = NO_CHECKPOINTS) -> nn.Module:
    """Train `model` in place with DP-SGD; returns the underlying (unwrapped) module.

    `opts` (resolved): clip, lr, grad_sample_mode, noise_multiplicity, physical_batch_size,
    private_optimizer, feedback_clip, precision, secure, base_optimizer. The EMA tracker (when
    opts.ema) is the caller's, so that it can export it.
    noise_multiplicity K (DPDM): each example's loss is averaged over K independent draws
    of the model's internal randomness (diffusion noise level and noise) BEFORE its
    gradient is clipped, so one example still contributes one clipped gradient.
    physical_batch_size splits each Poisson (logical) batch into chunks whose clipped
    gradients are summed before the single noisy step (opacus' virtual steps), so large
    logical batches fit in memory; the mechanism is unchanged.
    private_optimizer: "dpsgd" (opacus' DPOptimizer) or "efsgd" (error feedback; see
    `training.efsgd`), both accounted by the caller's events with `noise_multiplier`.
    precision "bf16": the per-sample loss's forward under bf16 autocast (`with_precision`); the
    parameters, per-example norms, clipping factors, clipped sums and noise stay fp32.
    The sensitive images are moved to the model's device once and batches drawn there by index
    (`distributed.PoissonBatches`); a convolutional model on the GPU trains in channels_last (bk, vmap).
    checkpoints.resume: a state from `training.checkpoint.capture_state`; training continues
    after its step with its weights, optimizer, EMA and RNG. checkpoints(step, snapshot) is
    called at every logical step boundary.
    """
    check_values(opts)
    mode, clip, k = opts.grad_sample_mode or "bk", opts.clip, opts.noise_multiplicity or 1
    check_combination(opts.replace(grad_sample_mode=mode))
    if clip is None:
        raise BadInput("clip is required for DP-SGD")
    # plan.dataset_size is the DECLARED N (the true size unless --public-size replaced it): it alone
    # sets q, the steps and the gradient denominator, so the true size is not otherwise released.
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    private_optimizer = opts.private_optimizer or "dpsgd"
    check_private_optimizer(private_optimizer, mode, opts.feedback_clip)
    check_dp_compatible(model)
    secure, resume, physical_batch_size = opts.secure, checkpoints.resume, opts.physical_batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device if trainable else torch.device("cpu")
    check_secure_available(secure, device)
    # Only where per-example gradients are right on NHWC tensors (tests/test_device_path.py): opacus'
    # conv grad/norm samplers (hooks, ghost) unfold by as_strided with NCHW strides, so on
    # channels_last their per-example gradients, and ghost's clipping factors, would be wrong.
    nhwc = mode in CHANNELS_LAST_MODES and prefers_channels_last(model, device)
    memory_format = torch.channels_last if nhwc else torch.preserve_format
    if memory_format == torch.channels_last:
        model.to(memory_format=memory_format)  # in place: the parameters stay the same objects
    per_sample_loss = with_precision(per_sample_loss, device, opts.precision)
    # No seeded generator on purpose: which images a Poisson batch holds must stay secret, so
    # sampling (and the noise) use the device's global RNG, which the caller seeds from OS entropy;
    # secure mode samples and draws the noise from opacus' CSPRNG (a CPU generator: CPU training only).
    secure_rng = PrivacyEngine(secure_mode=True).secure_rng if secure else None
    # One process: every example; under torchrun, this rank's shard of the one global Poisson
    # sample at rate q (training/distributed.py). Moved to the device once, drawn by index there.
    batches = distributed.poisson_batches(images, labels, plan.sample_rate, plan.steps_per_epoch, device=device,
                                          generator=secure_rng, memory_format=memory_format)
    check_poisson_sampler(batches, plan.sample_rate, plan.steps_per_epoch)
    base_optimizer = optimizers[opts.base_optimizer](model.parameters(), lr=opts.lr)
    start = restore_model_and_optimizer(resume, model, base_optimizer, ema) if resume else 0
    # opacus derives the denominator from len(dataset); the accounted one is the declared N * q.
    expected_batch_size = plan.dataset_size * plan.sample_rate
    if mode == "ghost":  # what opacus' make_private(grad_sample_mode="ghost") builds
        dp_model = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                        max_grad_norm=clip, use_ghost_clipping=True)
        dp_optimizer = DPOptimizerFastGradientClipping(base_optimizer, noise_multiplier=noise_multiplier,
                                                       max_grad_norm=clip, expected_batch_size=expected_batch_size,
                                                       loss_reduction="mean", generator=secure_rng,
                                                       secure_mode=secure)
    else:  # bk leaves the clipped sum in p.grad; the others per-example gradients in p.grad_sample
        per_example = (BookKeepingClipping(model, per_sample_loss, clip, k) if mode == "bk"
                       else PerExampleGradients(model, per_sample_loss, mode, k))
        dp_model = per_example.module
        dp_optimizer = make_private_optimizer(private_optimizer, base_optimizer, noise_multiplier=noise_multiplier,
                                              clip=clip, expected_batch_size=expected_batch_size,
                                              secure=secure, feedback_clip=opts.feedback_clip,
                                              clipped_sums=mode == "bk", generator=secure_rng)
    # ---- distributed (training/distributed.py): rank 0's weights everywhere; the clipped sums
    # all-reduced and rank 0's noise broadcast, once per logical step. No-ops in one process.
    dp_optimizer = distributed.noise_once_across_ranks(dp_optimizer)
    distributed.broadcast_module(model)
    # ---- end distributed

    def accumulate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Leave this chunk's per-example gradient material on the parameters."""
        if mode != "ghost":
            return per_example.compute(x, y)
        losses = per_sample_loss(dp_model, x, y)
        _check_loss_shape(losses, len(x))
        DPTensorFastGradientClipping(dp_model, dp_optimizer, losses, "mean").backward()
        return losses.detach()

    dp_model.train()
    trim_heap = HeapTrimmer() if device.type == "cpu" else (lambda: None)
    step = start
    chunk = physical_batch_size or len(images)
    per_epoch = plan.steps_per_epoch
    if resume:
        restore_rng(resume)  # after everything above: the next draw is the first resumed step's
    for epoch in range(start // per_epoch, plan.epochs):
        todo = per_epoch - start % per_epoch if epoch == start // per_epoch else per_epoch
        for x, y in itertools.islice(batches, todo):  # Poisson batches are independent across steps
            pieces = list(zip(x.split(chunk), y.split(chunk))) if len(x) else []
            loss_sum = 0.0
            if not pieces:
                # An empty Poisson batch still takes its noise-only step: the mechanism the
                # ledger accounts for releases noise at every step.
                dp_optimizer.zero_grad(set_to_none=True)
                for p in trainable:
                    if mode in ("ghost", "bk"):  # their optimizer sums p.grad, not grad_sample
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                dp_optimizer.signal_skip_step(do_skip=False)
                dp_optimizer.step()
            for i, (xc, yc) in enumerate(pieces):
                dp_optimizer.zero_grad(set_to_none=True)
                loss_sum += float(accumulate(xc, yc).sum())
                dp_optimizer.signal_skip_step(do_skip=i < len(pieces) - 1)
                dp_optimizer.step()
            if dp_optimizer._is_last_step_skipped:
                raise RuntimeError("DP optimizer did not take the noisy step at the end of a logical batch")
            step += 1
            trim_heap()  # varying Poisson batch sizes fragment the heap (training/memory.py)
            if ema is not None:
                ema.update(model)
            progress(phase, step, plan.steps, loss_sum / max(len(x), 1))
            checkpoints(step, lambda: capture_state(step, model, base_optimizer, ema))
    if step != plan.steps:
        raise RuntimeError(f"ran {step} DP-SGD steps but the ledger recorded {plan.steps}")
    distributed.check_in_sync(model, step)  # every rank: the same steps, the same weights
    if memory_format == torch.channels_last:
        model.to(memory_format=torch.contiguous_format)  # what is saved and sampled from: the usual layout
    return dp_model._module if hasattr(dp_model, "_module") else model


def _check_loss_shape(losses: torch.Tensor, rows: int) -> None:
    if losses.shape != (rows,):
        raise RuntimeError(f"per-sample loss must have shape ({rows},), got {tuple(losses.shape)}")


def train_nonprivate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
                     epochs: int, batch_size: int, lr: float, seed: int = 0,
                     augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     progress: Progress = no_progress, phase: str = "train (non-private)") -> nn.Module:
    """Plain Adam on public data or on already-released DP outputs (no privacy cost)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(TensorDataset(images, labels), batch_size=min(batch_size, len(images)),
                                         shuffle=True, generator=generator, drop_last=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    model.train()
    total, step = epochs * len(loader), 0
    for _ in range(epochs):
        for x, y in loader:
            if augment is not None:
                x = augment(x)
            optimizer.zero_grad(set_to_none=True)
            loss = per_sample_loss(model, x.to(device), y.to(device)).mean()
            loss.backward()
            optimizer.step()
            step += 1
            progress(phase, step, total, float(loss.detach()))
    return model

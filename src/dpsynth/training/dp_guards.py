"""Guards that fail loudly before a model or a sampler that would break the DP guarantee
reaches DP-SGD. The ledger's event assumes (1) Poisson sampling at the accounted rate and
(2) that every trainable parameter's gradient is a sum of per-sample gradients each
depending on its own sample only (so clipping bounds one image's influence)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from opacus import GradSampleModule
from torch import nn

from ..errors import BadInput


def check_poisson_sampler(batches, sample_rate: float, steps: int) -> None:
    """The batches actually used must be Poisson (`distributed.PoissonBatches`) at the accounted
    rate, `steps` per epoch, over this process's whole shard of the examples."""
    from .distributed import PoissonBatches, rank, world_size

    if type(batches) is not PoissonBatches:  # exact type: a subclass may draw otherwise
        raise RuntimeError(f"DP-SGD batches are drawn by {type(batches).__name__}, not Poisson (PoissonBatches); "
                           f"the ledger's amplification by sampling would not hold")
    if batches.sample_rate != sample_rate:
        raise RuntimeError(f"Poisson sample rate {batches.sample_rate} differs from the accounted {sample_rate}")
    if batches.steps != steps:
        raise RuntimeError(f"Poisson batches give {batches.steps} steps per epoch, the plan accounts for {steps}")
    if (batches.rank, batches.world_size) != (rank(), world_size()) or len(batches.shard) != len(batches.images):
        raise RuntimeError(f"Poisson batches hold shard {batches.rank}/{batches.world_size} of the examples, "
                           f"but this is process {rank()} of {world_size()}")


def check_per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                               per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                               atol: float = 1e-6) -> None:
    """On a copy of `model` and two small batches of NON-sensitive inputs (e.g. random ones of
    the right shape) that share their first sample, opacus must give every trainable parameter
    a per-sample gradient, and the first sample's must be the same in both batches. A layer
    that mixes samples (BatchNorm in train mode, a batch mean) or that opacus cannot see fails
    here. The RNG is reset before each pass so stochastic losses (VAE, diffusion) draw the
    same noise for the shared sample; the global RNG state is left as it was."""
    if len(x) < 2:
        raise ValueError("check_per_sample_gradients needs a batch of at least 2 samples")
    try:
        probe = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    except NotImplementedError as exc:  # opacus refuses e.g. BatchNorm with running statistics
        raise BadInput(f"model is not DP-SGD compatible: {' '.join(str(exc).split())}") from None
    probe.train()
    others = torch.roll(torch.arange(len(x)), 1)
    others[0] = 0
    first = _per_sample_grads(probe, x, y, per_sample_loss)
    second = _per_sample_grads(probe, x[others], y[others], per_sample_loss)
    probe._close()
    for name, a in first.items():
        if a is None:
            raise BadInput(f"parameter {name!r} ({_owner(model, name)}) gets no per-sample gradient in DP-SGD; "
                           f"replace that layer with one opacus supports")
        if not torch.allclose(a[0], second[name][0], atol=atol, rtol=1e-4):
            raise BadInput(f"parameter {name!r} ({_owner(model, name)}): one sample's gradient depends on the other "
                           f"samples in the batch (BatchNorm or a batch statistic?); DP-SGD's clipping would not "
                           f"bound one image's influence")


def _per_sample_grads(probe: GradSampleModule, x, y, per_sample_loss) -> dict:
    probe.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        per_sample_loss(probe, x, y).sum().backward()
    grads = {}
    for name, param in probe._module.named_parameters():
        if param.requires_grad:
            sample = getattr(param, "grad_sample", None)
            ok = sample is not None and sample.shape == (len(x), *param.shape)
            grads[name] = sample.detach().clone() if ok else None
    return grads


def _owner(model: nn.Module, param_name: str) -> str:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    module = model.get_submodule(module_name) if module_name else model
    return type(module).__name__

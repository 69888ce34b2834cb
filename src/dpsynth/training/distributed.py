"""Multi-process DP-SGD (torchrun): the same mechanism as one process, computed by N ranks.

The mechanism the ledger accounts for is, per logical step t (of exactly `plan.steps`):

    B_t  = each of the N examples independently with probability q   (Poisson, global rate q)
    g_t  = ( sum_{i in B_t} clip(grad_i, C) + N(0, sigma^2 C^2 I) ) / (N_declared * q)

Distributed, it is computed as follows (and nothing else changes):
- sampling (`PoissonBatches`, the one-process sampler with a shard): rank r owns the examples
  r, r+W, r+2W, ... and keeps each of them with probability q, from its own RNG (reseeded from
  OS entropy on every rank), by index on its device (its shard's images moved there once).
  The union over ranks is exactly one Poisson sample of the whole set at rate q. Every rank
  yields a batch at every step, possibly an empty one, so all ranks take the same steps
  (opacus' DistributedUniformWithReplacementSampler skips empty local batches, and ranks
  then pair different steps' collectives, or hang).
- clipping: each rank clips its own examples' gradients (per example, so where an example
  is computed changes nothing) and sums them, over as many physical chunks as it needs.
- noise, once (`noise_once_across_ranks`): at the logical step's end the ranks all-reduce
  (SUM) their clipped sums, so every rank holds the global clipped sum; rank 0 alone draws
  the Gaussian noise, and its noisy sum is broadcast, so every rank applies the one noise
  draw. The denominator is the single-process one (declared N * q), on every rank. This
  differs from opacus' DistributedDPOptimizer (noise on rank 0's local sum, then an
  all-reduce of the noisy sums / W, each rank dividing by N*q/W) only in where the sum is
  formed; the released g_t is the same. One scheme covers opacus' DPOptimizer, its ghost-
  clipping optimizer and EFSGD, whose error feedback needs the global unclipped sum too.
- weights: rank 0's are broadcast before the first step (as opacus' DPDDP does) and every
  rank then applies the same update; they are compared at the end (`check_in_sync`).

The module is not wrapped in DPDDP or DDP: DPDDP only broadcasts the weights (done here)
and hides the model's methods that per-sample losses call; torch's DDP all-reduces in every
backward, which would sum unclipped gradients and desynchronise ranks with different
numbers of physical chunks.

Only rank 0 touches the run directory (`pipeline.finetune`): it plans, writes the ledger
event (write-ahead) and only then sends the job to the other ranks, which therefore cannot
take a step before the event exists. Launch: `torchrun --nproc-per-node N -m dpsynth --
finetune ...` (the `--` keeps torchrun from reading finetune's `--run` as its `--run-path`)
or `dpsynth finetune --nproc N ...` (`launch_workers`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import BadInput

TIMEOUT_ENV = "DPSYNTH_DIST_TIMEOUT"    # seconds a rank waits in a collective before failing (default 1800)
BACKEND_ENV = "DPSYNTH_DIST_BACKEND"    # gloo or nccl (default: nccl when every local rank has its own GPU)
_GLOO_DRAIN_S = 0.2                     # see shutdown(): time for gloo threads to let go of finished work


# ---- the process group ---------------------------------------------------------------------------
def launched_world_size() -> int:
    """The world size torchrun set for this process (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun described in the environment (idempotent). Each rank
    takes GPU LOCAL_RANK when `device` is auto/cuda and GPUs are visible; nccl when every local
    rank has its own GPU, gloo otherwise (CPU, or several ranks sharing a GPU). Returns active()."""
    if launched_world_size() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return active()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(launched_world_size())))
    name = (device or "auto").lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus > 0 and name in ("auto", "cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank % gpus)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if on_gpu and gpus >= local_world else "gloo")
    if backend not in ("gloo", "nccl"):
        raise BadInput(f"${BACKEND_ENV}={backend!r} is unknown; choose gloo or nccl")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return active()


def shutdown(*, completed: bool = False) -> None:
    """Leave the process group. After a completed run every rank first waits at a barrier, so
    that none tears its connections down while a peer's last collective is still in flight (gloo
    aborts the peer with SIGABRT then); after a failure it leaves at once (a barrier would wait
    for a rank that may be gone)."""
    if dist.is_available() and dist.is_initialized():
        if completed and active():
            dist.barrier()
        dist.destroy_process_group()
        # A gloo worker thread can still be releasing the tensors of a finished collective,
        # which takes the GIL. Let it now: a thread that asks for the GIL once the interpreter
        # finalizes is killed inside a C++ destructor, and the whole rank dies with SIGABRT
        # ("terminate called without an active exception") after a run that succeeded.
        time.sleep(_GLOO_DRAIN_S)


@contextlib.contextmanager
def leaving_group_after():
    """Run the body, then leave the process group: through the barrier when it completed, at once when it raised."""
    try:
        yield
    except BaseException:
        shutdown()
        raise
    shutdown(completed=True)


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the only one that writes to the run directory."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (pickled; tensors inside travel with it)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
    if not active():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(obj: Any) -> list | None:
    """[rank 0's obj, rank 1's, ...] on every rank; None when not distributed."""
    if not active():
        return None
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_collective_device(tensor: torch.Tensor) -> torch.Tensor:
    device = _collective_device()
    return tensor if tensor.device == device else tensor.to(device)


def _all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """In place, one collective for all of them (gloo pays per call, not per byte, for small tensors)."""
    tensors = list(tensors)
    if not tensors:
        return
    flat = _on_collective_device(torch.cat([t.reshape(-1) for t in tensors]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    _unflatten_into(flat, tensors)


def _broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    tensors = list(tensors)
    if not tensors:
        return
    flat = _on_collective_device(torch.cat([t.detach().reshape(-1) for t in tensors]))
    dist.broadcast(flat, src=0)
    _unflatten_into(flat, tensors)


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


# ---- what a method may run distributed ----------------------------------------------------------
def check_method(method, processes: int) -> None:
    """Several processes only for the DP-SGD trainer (`training.dpsgd.train_dp`); methods with
    their own mechanism (GANs, mean embeddings, PE) run in one process."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise BadInput(f"nproc={processes!r} must be an integer >= 1")
    if processes > 1 and method.own_mechanism:
        raise BadInput(f"method {method.name!r} trains with its own mechanism, which runs in one process; "
                       f"{processes} processes are for the DP-SGD methods (`nproc` 1, or a DP-SGD method)")


# ---- sampling -------------------------------------------------------------------------------------
class PoissonBatches:
    """This process's part of one Poisson sample of the N examples per logical step, drawn by
    index on the training device: rank r of W owns the examples r, r+W, ... (all of them in one
    process) and keeps each independently with probability `sample_rate`, one uniform per owned
    example per step (`torch.rand(len(shard)) < q`, the law of opacus' UniformWithReplacementSampler).
    The union over ranks is one Poisson sample of the whole set at rate q.

    This process's images and labels are moved to `device` once; a batch is `images[mask],
    labels[mask]` there, so nothing is collated on the CPU. Every pass yields exactly `steps`
    batches, empty (zero-row) ones included, so every rank takes every accounted step. The uniforms come from `generator`
    when given (opacus' secure_rng, a CPU generator: drawn there, the mask moved), else from the
    device's global RNG, which the caller seeds from OS entropy: which examples a batch holds is
    secret. Nothing is drawn before the first step, so a checkpoint's RNG state resumes exactly.
    `memory_format` (torch.channels_last for convolutional models on the GPU) applies to 4-D images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, sample_rate: float, steps: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, generator=None,
                 memory_format: torch.memory_format = torch.preserve_format):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate {sample_rate} outside (0, 1]")
        self.device = torch.device(device)
        # this process's examples only (a strided view, copied to the device once)
        self.images = images[rank::world_size].to(self.device)
        if self.images.dim() == 4 and memory_format != torch.preserve_format:
            self.images = self.images.contiguous(memory_format=memory_format)
        self.labels = labels[rank::world_size].to(self.device)
        self.num_samples, self.sample_rate, self.steps = len(images), sample_rate, int(steps)
        self.rank, self.world_size, self.generator = rank, world_size, generator
        self.memory_format = memory_format
        self.shard = torch.arange(rank, self.num_samples, world_size)  # the indices owned, in the whole set

    def __len__(self) -> int:
        return self.steps

    def draw(self) -> torch.Tensor:
        """One step's inclusion mask over this process's examples (on the device)."""
        if self.generator is None:
            return torch.rand(len(self.shard), device=self.device) < self.sample_rate
        return (torch.rand(len(self.shard), generator=self.generator) < self.sample_rate).to(self.device)

    def __iter__(self):
        for _ in range(self.steps):
            mask = self.draw()
            x = self.images[mask]
            if x.dim() == 4 and self.memory_format != torch.preserve_format:
                x = x.contiguous(memory_format=self.memory_format)  # a no-op when indexing kept it
            yield x, self.labels[mask]


def poisson_batches(images: torch.Tensor, labels: torch.Tensor, sample_rate: float, steps: int, *,
                    device: torch.device | str = "cpu", generator=None,
                    memory_format: torch.memory_format = torch.preserve_format) -> PoissonBatches:
    """This process's Poisson batches: all the examples in one process, its shard under torchrun."""
    return PoissonBatches(images, labels, sample_rate=sample_rate, steps=steps, device=device, rank=rank(),
                          world_size=world_size(), generator=generator, memory_format=memory_format)


# ---- noise once per logical step ------------------------------------------------------------------
class _NoiseOnceAcrossRanks:
    """Mixin before an opacus DP optimizer class (see the module docstring). The per-parameter
    sums over this rank's examples are named by the optimizer's `rank_local_sums` (default
    summed_grad; EFSGD adds its unclipped sum)."""

    def add_noise(self):
        names = getattr(self, "rank_local_sums", ("summed_grad",))
        _all_reduce_sum([getattr(p, name) for name in names for p in self.params
                         if getattr(p, name, None) is not None])
        if is_main():
            super().add_noise()
        else:  # the noise-free part (EFSGD's next error state needs it); rank 0's noise comes next
            sigma = self.noise_multiplier
            self.noise_multiplier = 0.0
            try:
                super().add_noise()
            finally:
                self.noise_multiplier = sigma
        _broadcast_from_main([p.grad for p in self.params])


_DISTRIBUTED_CLASSES: dict[type, type] = {}


def noise_once_across_ranks(optimizer):
    """The opacus DP optimizer, made to add its noise once per logical step across all ranks
    (identity in one process). Its class is swapped for a subclass with the mixin, so that
    whatever built it (make_private, make_private_optimizer) stays unchanged."""
    if not active():
        return optimizer
    base = type(optimizer)
    if not hasattr(base, "add_noise") or not hasattr(base, "pre_step"):
        raise TypeError(f"{base.__name__} is not an opacus DP optimizer")
    if issubclass(base, _NoiseOnceAcrossRanks):
        return optimizer
    if base not in _DISTRIBUTED_CLASSES:
        _DISTRIBUTED_CLASSES[base] = type(f"NoiseOnce{base.__name__}", (_NoiseOnceAcrossRanks, base), {})
    optimizer.__class__ = _DISTRIBUTED_CLASSES[base]
    return optimizer


# ---- weights ----------------------------------------------------------------------------------------
def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what opacus' DPDDP does at construction)."""
    if active():
        _broadcast_from_main([*model.parameters(), *model.buffers()])


def check_in_sync(model: nn.Module, steps: int) -> None:
    """Every rank took `steps` steps and holds the same weights; a divergence would mean the
    ranks did not run the one accounted mechanism."""
    if not active():
        return
    with torch.no_grad():
        digest = [float(steps)] + [float(p.detach().double().sum()) for p in model.parameters()]
    digests = gather_objects(digest)
    if any(d != digests[0] for d in digests):
        raise RuntimeError(f"ranks diverged after DP-SGD (steps or weights differ across {len(digests)} ranks)")


# ---- launching ----------------------------------------------------------------------------------------
def launch_workers(processes: int, argv: Sequence[str]) -> int:
    """Run `python -m dpsynth ARGV` in `processes` local worker processes under torch's elastic
    launcher (what `torchrun --standalone --nproc-per-node N` does); returns the exit status
    (rank 0's when a worker failed). Our arguments never pass through torchrun's parser."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # the cores are shared out, as torchrun does
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"dpsynth-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "dpsynth", *argv)
    except ChildFailedError as exc:
        codes = {failure.local_rank: failure.exitcode for failure in exc.failures.values()}
        code = codes.get(0, codes[min(codes)])
        return code if code > 0 else 128 - code  # killed by signal s: 128 + s, as a shell says
    except SignalException as exc:  # Ctrl-C / SIGTERM: the launcher passed it on to the workers
        return 128 + int(exc.sigval)  # and gave them time to checkpoint at a step boundary
    return 0

"""PE's "API": a pretrained generative model used only through two calls.

    random(labels)                    -> new images, one per public label handle
    variation(images, labels, degree) -> one variation of each image, under its handle

Images are uint8 (N, C, H, W) at the sensitive set's resolution and channels. `labels` are
the model's own (public) class handles: PE draws one uniformly per initial sample and keeps it
through every variation (DPImageBench's improved-diffusion API does the same); the PRIVATE
class is the population block, never shown to the API. `degree` is the API's own measure of
how far a variation may move; for the default API it is the start noise level sigma (EDM's
VE scale on [-1, 1] pixels): larger = more variation, >= sigma_max regenerates all but the label.

The default API is dpsynth's class-conditional EDM diffusion model pretrained on the public
set (`dpsynth pretrain`). A bigger model on disk plugs in through `--train-opts
api=MODULE:FACTORY`: MODULE is importable (on PYTHONPATH), and
`FACTORY(resolution=, channels=, num_classes=, device=)` returns a `GenerationAPI`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

from ...errors import BadInput
from ...models.edm import EDMDiffusion


class GenerationAPI(ABC):
    """The interface PE needs of a generative model (module docstring)."""

    num_labels: int  # handles are 0 .. num_labels - 1

    @abstractmethod
    def random(self, labels: torch.Tensor) -> torch.Tensor:
        """uint8 (len(labels), C, H, W): fresh samples, one per handle."""

    @abstractmethod
    def variation(self, images: torch.Tensor, labels: torch.Tensor, degree: float) -> torch.Tensor:
        """uint8 images like `images`: one variation of each, under its handle."""


class EDMGenerationAPI(GenerationAPI):
    """dpsynth's EDM model as PE's API. random: the Heun sampler from sigma_max; variation:
    SDEdit, x = x0 + degree * eps, then Heun down the same Karras schedule from `degree` (the
    levels below it), as DPImageBench's PE-SD API (sd_api.py `_image_variation`)."""

    def __init__(self, model: EDMDiffusion, *, steps: int, device: torch.device, batch_size: int = 256,
                 generator: torch.Generator | None = None):
        self.model = model.to(device).eval()
        self.steps, self.device, self.batch_size = int(steps), device, int(batch_size)
        self.generator = generator  # CPU; the draws are post-processing (no privacy role)
        self.num_labels = model.cfg.num_classes

    def random(self, labels):
        return self.variation(None, labels, float(self.model.cfg.sigma_max))

    def variation(self, images, labels, degree):
        degree = float(degree)
        if not degree > 0:
            raise BadInput(f"`train_opts` variation degree {degree!r} must be a noise level > 0")
        levels = [float(s) for s in self.model.noise_levels(self.steps, torch.device("cpu"))]
        sigmas = [min(degree, levels[0])] + [s for s in levels if s < min(degree, levels[0])]
        out = []
        for start in range(0, len(labels), self.batch_size):
            y = labels[start:start + self.batch_size]
            c, r = self.model.cfg.channels, self.model.cfg.resolution
            noise = torch.randn((len(y), c, r, r), generator=self.generator, dtype=torch.float64)
            x = noise * sigmas[0]
            if images is not None:
                x = x + EDMDiffusion.to_model_range(images[start:start + self.batch_size]).double()
            out.append(self._heun(x.to(self.device), sigmas, y.to(self.device)))
        return torch.cat(out)

    @torch.no_grad()
    def _heun(self, x: torch.Tensor, sigmas: list[float], labels: torch.Tensor) -> torch.Tensor:
        """EDM's deterministic 2nd-order steps over `sigmas` (descending, ending at 0)."""
        def denoise(v, s):
            return self.model.denoise(v.float(), torch.full((len(v),), s, device=v.device), labels).double()

        for s_cur, s_next in zip(sigmas, sigmas[1:]):
            d_cur = (x - denoise(x, s_cur)) / s_cur
            x_next = x + (s_next - s_cur) * d_cur
            if s_next > 0:
                d_next = (x_next - denoise(x_next, s_next)) / s_next
                x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
        return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def factory_from_spec(spec) -> callable:
    """'module:factory' (or ['module', 'factory'], as k=v parsing splits it) -> the callable."""
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).rsplit(":", 1)
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise BadInput(f"`train_opts` api={spec!r} must be MODULE:FACTORY (an importable module and a callable in it)")
    module_name, attr = parts
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInput(f"`train_opts` api={module_name}:{attr}: module {module_name!r} cannot be imported ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadInput(f"`train_opts` api={module_name}:{attr}: {module_name} has no callable {attr!r}")
    return factory


def external_api(spec, *, resolution: int, channels: int, num_classes: int, device: torch.device) -> GenerationAPI:
    api = factory_from_spec(spec)(resolution=resolution, channels=channels, num_classes=num_classes, device=device)
    if not all(callable(getattr(api, name, None)) for name in ("random", "variation")) or \
            not (isinstance(getattr(api, "num_labels", None), int) and api.num_labels >= 1):
        raise BadInput(f"`train_opts` api={spec!r} returned {type(api).__name__}, which is not a GenerationAPI "
                       f"(random, variation and an integer num_labels >= 1)")
    return api


def checked_images(images, n: int, shape: tuple[int, int, int], call: str) -> torch.Tensor:
    """What an API returned must be n uint8 images of the sensitive set's shape."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != (n, *shape):
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__)
        raise BadInput(f"the PE API's {call} returned {got}; it must return uint8 images of shape {(n, *shape)}")
    return images.cpu()

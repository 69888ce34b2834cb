"""A stub generation API for PE's tests only (loaded by `--train-opts api=pe_stub_api:make_api`).

Images are flat: every pixel of an image has one value. `random` draws the value uniformly;
`variation` moves it by at most `degree` (uniformly). Handles are kept as given. FAIL_AT > 0
makes the FAIL_AT-th variation call raise (a crash in the middle of PE's iterations)."""

from __future__ import annotations

import torch

from dpsynth.methods.pe.api import GenerationAPI

FAIL_AT = 0
CALLS = {"random": 0, "variation": 0}


class FlatImageAPI(GenerationAPI):
    def __init__(self, resolution: int, channels: int, num_labels: int = 3, seed: int = 0):
        self.shape = (channels, resolution, resolution)
        self.num_labels = num_labels
        self.rng = torch.Generator().manual_seed(seed)
        self.seen_handles: list[torch.Tensor] = []

    def _images(self, values: torch.Tensor) -> torch.Tensor:
        return values.round().clamp(0, 255).to(torch.uint8)[:, None, None, None].expand(-1, *self.shape).clone()

    def random(self, labels):
        CALLS["random"] += 1
        self.seen_handles.append(labels.clone())
        return self._images(torch.rand(len(labels), generator=self.rng) * 255)

    def variation(self, images, labels, degree):
        CALLS["variation"] += 1
        if FAIL_AT and CALLS["variation"] == FAIL_AT:
            raise RuntimeError("stub API failed")
        self.seen_handles.append(labels.clone())
        step = (torch.rand(len(images), generator=self.rng) * 2 - 1) * float(degree)
        return self._images(images[:, 0, 0, 0].float() + step)


def make_api(*, resolution, channels, num_classes, device):
    return FlatImageAPI(resolution, channels)

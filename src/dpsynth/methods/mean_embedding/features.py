"""Feature maps phi of the mean-embedding methods, each with ||phi(x)||_2 <= 1 for every input.

The bound is what the Gaussian releases rely on (see release.py), so it holds by construction,
not by clipping:
- `RandomFourierFeatures` (DP-MERF; several bandwidths: DP-Kernel): for each bandwidth b,
  m = features/2 frequencies w_j ~ N(0, I/b^2) give [cos(w_j.x), sin(w_j.x)]_j / sqrt(L*m), whose
  squared norm is sum_j (cos^2 + sin^2) / (L*m) = 1 per block over L blocks: exactly 1 in total.
  E[phi(x).phi(x')] = mean over bandwidths of exp(-||x - x'||^2 / (2 b^2)) (Rahimi & Recht).
- `NTKFeatures` (DP-NTK): the gradient of a small random ReLU MLP's scalar output with respect
  to its parameters, divided by its norm: exactly 1. The output bias has gradient 1, so the
  norm is never 0.

Inputs are flattened images with pixels in [0, 1]. Every map offers `class_sums(x, weights)`
= weights^T phi(x), shape (K, D): the release sums over the sensitive set with one-hot weights,
the generator's loss averages with per-class weights. NTK computes it without materialising
the (B, D) per-example gradients (they are outer products), which keeps 60,000 images cheap.
The random parameters are drawn from the given generator (default: the global RNG, which the
finetune stage reseeds from OS entropy); they are independent of the data.
"""

from __future__ import annotations

import math

import torch

from ...errors import BadInput
from ...validation import check_positive


class FeatureMap:
    dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> (B, dim), each row of norm <= 1."""
        raise NotImplementedError

    def class_sums(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(K, dim) = weights^T phi(x) for weights of shape (B, K)."""
        return weights.t().to(x.dtype) @ self(x)

    def to(self, device: torch.device) -> "FeatureMap":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                setattr(self, name, [v.to(device) for v in value])
        return self


class RandomFourierFeatures(FeatureMap):
    def __init__(self, input_dim: int, features: int, bandwidths, generator: torch.Generator | None = None):
        bandwidths = [float(b) for b in (bandwidths if isinstance(bandwidths, (list, tuple)) else [bandwidths])]
        if not bandwidths or any(not math.isfinite(b) or b <= 0 for b in bandwidths):
            raise BadInput(f"RFF bandwidths {bandwidths!r} must be numbers > 0")
        if not isinstance(features, int) or features < 2 or features % 2:
            raise BadInput(f"RFF features={features!r} must be an even integer >= 2 (cos and sin pairs)")
        self.bandwidths = bandwidths
        half = features // 2
        # One (half, input_dim) block per bandwidth, stacked: x @ W^T gives all phases at once.
        self.frequencies = torch.cat([torch.randn(half, input_dim, generator=generator) / b for b in bandwidths])
        self.scale = 1.0 / math.sqrt(len(bandwidths) * half)
        self.dim = 2 * half * len(bandwidths)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        phase = x @ self.frequencies.t()
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1) * self.scale


class NTKFeatures(FeatureMap):
    """f(x) = w3 . relu(W2 relu(W1 x + b1) + b2) + b3, PyTorch's default Linear initialisation
    (uniform in +-1/sqrt(fan_in)); phi(x) = grad_theta f(x) / ||grad_theta f(x)||, parameters in the
    order W1, b1, W2, b2, w3, b3 (as `torch.func` would list them for Linear layers).

    Backpropagation written out by hand, so batches need no per-example autograd:
      a1 = W1 x + b1, h1 = relu(a1), a2 = W2 h1 + b2, h2 = relu(a2)
      df/db3 = 1, df/dw3 = h2, d2 = w3 * [a2 > 0], df/dW2 = d2 h1^T, df/db2 = d2,
      d1 = (W2^T d2) * [a1 > 0], df/dW1 = d1 x^T, df/db1 = d1
      ||grad||^2 = 1 + ||h2||^2 + ||d2||^2 (||h1||^2 + 1) + ||d1||^2 (||x||^2 + 1).
    The test compares it with torch.func's per-example gradients.
    """

    def __init__(self, input_dim: int, width: int, width2: int, generator: torch.Generator | None = None):
        for name, value in (("ntk_width", width), ("ntk_width2", width2)):
            check_positive(name, value, integer=True)

        def uniform(shape, fan_in):
            return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

        self.W1, self.b1 = uniform((width, input_dim), input_dim), uniform((width,), input_dim)
        self.W2, self.b2 = uniform((width2, width), width), uniform((width2,), width)
        self.w3, self.b3 = uniform((width2,), width2), uniform((1,), width2)
        self.dim = width * input_dim + width + width2 * width + width2 + width2 + 1

    def parameters(self) -> list[torch.Tensor]:
        return [self.W1, self.b1, self.W2, self.b2, self.w3, self.b3]

    def output(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The scalar network itself, for one example (reference for tests)."""
        W1, b1, W2, b2, w3, b3 = params
        return (w3 * torch.relu(W2 @ torch.relu(W1 @ x + b1) + b2)).sum() + b3.sum()

    def _parts(self, x: torch.Tensor):
        a1 = x @ self.W1.t() + self.b1
        h1 = torch.relu(a1)
        a2 = h1 @ self.W2.t() + self.b2
        h2 = torch.relu(a2)
        d2 = self.w3 * (a2 > 0).to(x.dtype)
        d1 = (d2 @ self.W2) * (a1 > 0).to(x.dtype)
        sq = lambda t: (t * t).sum(1)  # noqa: E731
        norm = torch.sqrt(1.0 + sq(h2) + sq(d2) * (sq(h1) + 1.0) + sq(d1) * (sq(x) + 1.0))
        return h1, h2, d1, d2, 1.0 / norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h1, h2, d1, d2, inv = self._parts(x)
        b = len(x)
        grads = [(d1[:, :, None] * x[:, None, :]).reshape(b, -1), d1, (d2[:, :, None] * h1[:, None, :]).reshape(b, -1),
                 d2, h2, torch.ones(b, 1, dtype=x.dtype, device=x.device)]
        return torch.cat(grads, dim=1) * inv[:, None]

    def class_sums(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h1, h2, d1, d2, inv = self._parts(x)
        w = weights.to(x.dtype) * inv[:, None]  # (B, K): the normalisation folded into the weights
        b, k = w.shape

        def outer_sum(delta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            # sum_i w_ik delta_i inputs_i^T for every k, as one matmul: (K*a, B) @ (B, d)
            weighted = (w[:, :, None] * delta[:, None, :]).reshape(b, -1)
            return (weighted.t() @ inputs).reshape(k, -1)

        return torch.cat([outer_sum(d1, x), w.t() @ d1, outer_sum(d2, h1), w.t() @ d2, w.t() @ h2,
                          w.sum(0)[:, None]], dim=1)

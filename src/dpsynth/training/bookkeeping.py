"""Book-keeping per-example clipping (grad_sample_mode "bk"): each example's gradient norm and
the clipped sum of gradients from ONE ordinary backward pass, at close to plain training's cost.

The idea is Bu et al.'s book-keeping / mixed ghost clipping ("Differentially private
optimization on large model at small cost", 2023); this is our own implementation for the
layers dpsynth's models use. For a layer y = W a (over positions t), an example's weight
gradient is sum_t g_t a_t^T, with a_t the layer's input and g_t the gradient of the loss at
its output. So one backward that returns only the OUTPUT gradients of the layers (no weight
gradient is formed there) is enough to

1. compute every example's gradient norm, per layer the cheaper of
   - the ghost norm, ||sum_t a_t g_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) (no gradient formed), or
   - the materialised per-example gradient (then its squared norm);
2. clip: c_i = min(1, C / (||g_i|| + 1e-6)), opacus' factor;
3. form the clipped SUM sum_i c_i g_i with the layer's ordinary weight-gradient formula on
   output gradients scaled by c_i (or, where the per-example gradients were materialised,
   their c-weighted sum).

The clipped sum is left in `p.grad`; opacus' DPOptimizerFastGradientClipping then adds the
Gaussian noise (std noise_multiplier * C) and divides by the expected batch size.

Noise multiplicity K: the rows of a chunk are its B examples each repeated K times, grouped
example by example; an example's gradient is that of its K-draw MEAN loss, so the K rows of
an example are treated as K times as many positions of one example (the backward runs on
sum(losses) / K).

Every trainable parameter must sit in a supported layer (Linear, Conv2d, GroupNorm,
LayerNorm, Embedding), used through that layer's forward; anything else is refused by name.
`check_bookkeeping_covers` checks on random inputs that the per-example gradients add up to
autograd's gradient (a parameter used outside its layer's forward would not).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..errors import BadInput

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
STRATEGIES = ("auto", "ghost", "materialise")


class _Layer:
    """One layer's book for one chunk: fed each call's (input, output gradient) as the backward
    reaches it (`add`, so gradients are consumed while hot and freed as in plain training), then
    its examples' squared gradient norms (`sq_norms`), then its clipped sums (`write_clipped`)."""

    def __init__(self, module: nn.Module, b: int, k: int, strategy: str):
        self.module, self.b, self.k, self.strategy = module, b, k, strategy
        self.mat = None     # (B, *weight.shape): materialised per-example weight gradients, summed over calls
        self.pairs = []     # calls kept for the ghost norm and the ordinary clipped-sum formula
        self.bias_pe = None  # (B, *bias.shape)

    def _trains(self, name: str) -> bool:
        p = getattr(self.module, name, None)
        return p is not None and p.requires_grad

    def capture(self, inputs: tuple, output: torch.Tensor):
        """What the forward hook keeps for add(): the layer's input."""
        return inputs[0].detach()

    def add(self, held, g: torch.Tensor) -> None:  # held: what capture() kept
        raise NotImplementedError

    def sq_norms(self) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def write_clipped(self, c: torch.Tensor) -> None:  # c: (B,) clipping factors; sets p.grad
        raise NotImplementedError


def _acc(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total.add_(value)


def _set_grad(p: nn.Parameter | None, value: torch.Tensor) -> None:
    if p is not None and p.requires_grad:
        value = value.to(p.dtype).view_as(p)
        p.grad = value if p.grad is None else p.grad + value


def _rows_to_examples(t: torch.Tensor, b: int) -> torch.Tensor:
    """(B*K, ...) per-row quantities -> (B, ...) per-example sums over the K rows."""
    return t.reshape(b, -1, *t.shape[1:]).sum(1) if t.shape[0] != b else t


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-row squared norm of (B, ...)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def _weighted_sum(c: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    return c.to(per_example.dtype) @ per_example.reshape(per_example.shape[0], -1)


def _scale_rows(t: torch.Tensor, c: torch.Tensor, b: int) -> torch.Tensor:
    """Each row of (B*K, ...) times its example's factor c (B,)."""
    return (t.reshape(b, -1) * c.to(t.dtype)[:, None]).reshape(t.shape)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t a_t^T||^2 per example for a (B, T, i), g (B, T, o), without forming it."""
    if a.shape[1] == 1:
        return _sq(a) * _sq(g)
    aa = torch.bmm(a, a.transpose(1, 2))
    gg = torch.bmm(g, g.transpose(1, 2))
    return torch.linalg.vecdot(aa.reshape(len(a), -1), gg.reshape(len(a), -1))


def _prefer_ghost(positions: int, d_in: int, d_out: int, strategy: str) -> bool:
    """Ghost costs ~2 T^2 (i + o) per example; materialising costs the per-example weight
    gradient in small batched products plus its norm and weighted sum (~3 i o); the ghost
    path's clipped sum is one ordinary weight-gradient product, as large as the materialising."""
    if strategy != "auto":
        return strategy == "ghost"
    return 2 * positions * positions * (d_in + d_out) <= 3 * d_in * d_out


class _Linear(_Layer):
    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        m, b = self.module, self.b
        # (B*K, ..., d) rows grouped by example -> (B, K*T, d): the K rows are more positions.
        a = x.reshape(b, -1, m.in_features).float()
        g = g.reshape(b, -1, m.out_features).float()
        if self._trains("bias"):
            self.bias_pe = _acc(self.bias_pe, g.sum(1))
        if self._trains("weight"):
            if _prefer_ghost(a.shape[1], m.in_features, m.out_features, self.strategy):
                self.pairs.append((a, g))
            else:
                self.mat = _acc(self.mat, torch.bmm(g.transpose(1, 2), a))  # (B, o, i)

    def sq_norms(self) -> torch.Tensor:
        if self.pairs and self.mat is not None:  # calls of both kinds: cross terms need the gradients
            for a, g in self.pairs:
                self.mat.add_(torch.bmm(g.transpose(1, 2), a))
            self.pairs = []
        total = torch.zeros(self.b, device=self.module.weight.device)
        if self.mat is not None:
            total += _sq(self.mat)
        if self.pairs:  # several calls are more positions of the same examples
            total += _ghost_sq(torch.cat([a for a, _ in self.pairs], 1), torch.cat([g for _, g in self.pairs], 1))
        if self.bias_pe is not None:
            total += _sq(self.bias_pe)
        return total

    def write_clipped(self, c: torch.Tensor) -> None:
        m = self.module
        weight = _weighted_sum(c, self.mat) if self.mat is not None else None
        for a, g in self.pairs:
            if a.shape[-1] < g.shape[-1]:  # scale the smaller operand
                a = a * c[:, None, None]
            else:
                g = g * c[:, None, None]
            weight = _acc(weight, g.reshape(-1, m.out_features).t() @ a.reshape(-1, m.in_features))
        if weight is not None:
            _set_grad(m.weight, weight)
        if self.bias_pe is not None:
            _set_grad(m.bias, c @ self.bias_pe)


class _Conv2d(_Layer):
    def __init__(self, *args):
        super().__init__(*args)
        m = self.module
        # Non-zero padding modes and string padding are applied to the input here, so the
        # weight-gradient formulas see plain zero padding.
        self.pre_pad = m.padding_mode != "zeros" or m.padding == "same"
        self.padding = (0, 0) if self.pre_pad or m.padding == "valid" else _pair(m.padding)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not self.pre_pad:
            return x
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(x, m._reversed_padding_repeated_twice, mode=mode)

    def _per_row_weight_grads(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(R, *weight.shape): each row's weight gradient, without an unfolded copy of the input.

        - few output channels (e.g. a last layer to 1 or 3 image channels), stride and dilation 1:
          the gradient is a correlation of the output gradient (as the input, its channels as the
          batch) with each row's input (as a kernel), one group per row, flipped;
        - otherwise one grouped convolution-backward with the rows as groups."""
        m = self.module
        r = x.shape[0]
        w = m.weight
        kh, kw = w.shape[2:]
        ph, pw = self.padding
        if (m.groups == 1 and m.stride == (1, 1) and m.dilation == (1, 1) and ph <= kh - 1 and pw <= kw - 1
                and 4 * m.out_channels <= m.in_channels):
            out = F.conv2d(g.transpose(0, 1), x.reshape(r * x.shape[1], 1, *x.shape[2:]),
                           padding=(kh - 1 - ph, kw - 1 - pw), groups=r)  # (Cout, R*Cin, kh, kw)
            out = out.flip(2, 3).reshape(w.shape[0], r, w.shape[1], kh, kw)
            return out.transpose(0, 1)
        out = torch.nn.grad.conv2d_weight(
            x.reshape(1, r * x.shape[1], *x.shape[2:]), (r * w.shape[0], *w.shape[1:]),
            g.reshape(1, r * g.shape[1], *g.shape[2:]), m.stride, self.padding, m.dilation, r * m.groups)
        return out.reshape(r, *w.shape)

    def _unfolded(self, x: torch.Tensor, g: torch.Tensor):
        """Per example and group: a (B*G, K*T, Cin/G*kh*kw), g (B*G, K*T, Cout/G)."""
        m, b = self.module, self.b
        groups = m.groups
        u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        t = u.shape[2]
        u = u.reshape(b, -1, groups, u.shape[1] // groups, t).permute(0, 2, 1, 4, 3)
        gg = g.reshape(b, -1, groups, g.shape[1] // groups, t).permute(0, 2, 1, 4, 3)
        return u.reshape(b * groups, -1, u.shape[-1]), gg.reshape(b * groups, -1, gg.shape[-1])

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        m, b = self.module, self.b
        x, g = self._input(x.float()), g.float()
        if self._trains("bias"):
            self.bias_pe = _acc(self.bias_pe, _rows_to_examples(g.sum((2, 3)), b))
        if self._trains("weight"):
            positions = self.k * g.shape[2] * g.shape[3]
            d_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            ghost = (_prefer_ghost(positions, d_in, m.out_channels, self.strategy) if m.groups == 1
                     else self.strategy == "ghost")
            if ghost:
                self.pairs.append((x, g))
            else:
                self.mat = _acc(self.mat, _rows_to_examples(self._per_row_weight_grads(x, g), b))

    def sq_norms(self) -> torch.Tensor:
        m, b = self.module, self.b
        if self.pairs and self.mat is not None:
            for x, g in self.pairs:
                self.mat.add_(_rows_to_examples(self._per_row_weight_grads(x, g), b))
            self.pairs = []
        total = torch.zeros(b, device=m.weight.device)
        if self.mat is not None:
            total += _sq(self.mat)
        if self.pairs:
            unfolded = [self._unfolded(x, g) for x, g in self.pairs]
            a = torch.cat([u for u, _ in unfolded], 1)
            gg = torch.cat([v for _, v in unfolded], 1)
            total += _ghost_sq(a, gg).reshape(b, m.groups).sum(1)
        if self.bias_pe is not None:
            total += _sq(self.bias_pe)
        return total

    def write_clipped(self, c: torch.Tensor) -> None:
        m, b = self.module, self.b
        weight = _weighted_sum(c, self.mat) if self.mat is not None else None
        for x, g in self.pairs:
            weight = _acc(weight, torch.nn.grad.conv2d_weight(x, m.weight.shape, _scale_rows(g, c, b), m.stride,
                                                              self.padding, m.dilation, m.groups))
        if weight is not None:
            _set_grad(m.weight, weight)
        if self.bias_pe is not None:
            _set_grad(m.bias, c @ self.bias_pe)


def _group_norm_row_grads(m: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, want_gamma: bool, stats=None):
    """Per row and channel: d beta = sum g, d gamma = sum g * x_hat over the channel's positions.
    With the forward's own group statistics (`stats` = mean, rstd, each (rows, groups)), d gamma
    = rstd * (sum g x - mean * sum g), torch's own GroupNorm backward formula, so x_hat is never
    formed; without them x_hat is recomputed by the same normalisation as the forward."""
    rows, c = x.shape[:2]
    gs = g.reshape(rows, c, -1)
    dbeta = gs.sum(2)
    if not want_gamma:
        return None, dbeta
    if stats is not None:
        mean, rstd = (t.float().repeat_interleave(c // m.num_groups, dim=1) for t in stats)
        return (torch.linalg.vecdot(gs, x.reshape(rows, c, -1)) - mean * dbeta) * rstd, dbeta
    x_hat = F.group_norm(x, m.num_groups, eps=m.eps).reshape(rows, c, -1)
    return torch.linalg.vecdot(gs, x_hat), dbeta


class _Norm(_Layer):
    """GroupNorm and LayerNorm: per-example gradients are per-channel sums, small enough to
    materialise directly: d gamma = sum g * x_hat, d beta = sum g."""

    def capture(self, inputs: tuple, output: torch.Tensor):
        """GroupNorm: also the forward's mean and rstd, saved by torch's own kernel (when that is
        the kernel that ran), so that add() need not normalise the input again."""
        node = output.grad_fn
        if isinstance(self.module, nn.GroupNorm) and type(node).__name__ == "NativeGroupNormBackward0":
            return inputs[0].detach(), (node._saved_result1.detach(), node._saved_result2.detach())
        return inputs[0].detach(), None

    def add(self, held: tuple, g: torch.Tensor) -> None:
        m, b = self.module, self.b
        (x, stats), g = held, g.float()
        x = x.float()
        if isinstance(m, nn.GroupNorm):
            dgamma, dbeta = _group_norm_row_grads(m, x, g, self._trains("weight"), stats)
        else:
            shape, rows = m.normalized_shape, x.shape[0]
            dgamma = (g * F.layer_norm(x, shape, eps=m.eps)).reshape(rows, -1, *shape).sum(1) \
                if self._trains("weight") else None
            dbeta = g.reshape(rows, -1, *shape).sum(1)
        if self._trains("weight"):
            self.mat = _acc(self.mat, _rows_to_examples(dgamma, b))
        if self._trains("bias"):
            self.bias_pe = _acc(self.bias_pe, _rows_to_examples(dbeta, b))

    def sq_norms(self) -> torch.Tensor:
        total = torch.zeros(self.b, device=self.module.weight.device)
        for pe in (self.mat, self.bias_pe):
            if pe is not None:
                total += _sq(pe)
        return total

    def write_clipped(self, c: torch.Tensor) -> None:
        if self.mat is not None:
            _set_grad(self.module.weight, _weighted_sum(c, self.mat))
        if self.bias_pe is not None:
            _set_grad(self.module.bias, _weighted_sum(c, self.bias_pe))


class _Embedding(_Layer):
    """An example's gradient has a row per distinct index it looks up: its squared norm is
    sum_{t,s} [idx_t = idx_s] (g_t . g_s) (ghost, exact), the clipped sum an index_add."""

    def __init__(self, *args):
        super().__init__(*args)
        m = self.module
        if m.scale_grad_by_freq or m.sparse:
            raise BadInput("grad_sample_mode=bk does not support nn.Embedding with scale_grad_by_freq or sparse "
                           "gradients; use grad_sample_mode=vmap")

    def add(self, idx: torch.Tensor, g: torch.Tensor) -> None:
        m, b = self.module, self.b
        idx, g = idx.reshape(b, -1), g.float().reshape(b, -1, m.embedding_dim)
        if m.padding_idx is not None:  # the padding row gets no gradient
            g = g.masked_fill((idx == m.padding_idx)[..., None], 0.0)
        self.pairs.append((idx, g))

    def sq_norms(self) -> torch.Tensor:
        self.idx = torch.cat([i for i, _ in self.pairs], 1)
        self.g = torch.cat([g for _, g in self.pairs], 1)
        if self.idx.shape[1] == 1:
            return _sq(self.g)
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.g.dtype)
        gg = torch.bmm(self.g, self.g.transpose(1, 2))
        return (same * gg).sum((1, 2))

    def write_clipped(self, c: torch.Tensor) -> None:
        m = self.module
        scaled = (self.g * c[:, None, None]).reshape(-1, m.embedding_dim)
        out = torch.zeros(m.weight.shape, dtype=scaled.dtype, device=scaled.device)
        _set_grad(m.weight, out.index_add_(0, self.idx.reshape(-1), scaled))


def _handler(module: nn.Module) -> type[_Layer]:
    if isinstance(module, nn.Linear):
        return _Linear
    if isinstance(module, nn.Conv2d):
        return _Conv2d
    if isinstance(module, nn.Embedding):
        return _Embedding
    return _Norm


def _sources(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The recorded outputs that depend on no other recorded output. Asking autograd for the
    gradients at these alone makes it run every node between them and the loss, so the hooks of
    all recorded outputs fire, while it forms no weight gradient and keeps no other gradient."""
    recorded = {o.grad_fn for o in outputs}
    below: dict = {}  # node -> a recorded node is reachable under it (itself excluded)
    for start in recorded:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in below and not expanded:
                continue
            children = [n for n, _ in node.next_functions if n is not None]
            if expanded:
                below[node] = any(c in recorded or below[c] for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in below)
    return [o for o in outputs if not below[o.grad_fn]]


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that own trainable parameters; refuses any that book-keeping cannot clip."""
    layers, seen = [], {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) not in SUPPORTED_LAYERS:  # exact types: a subclass may compute something else
            raise BadInput(f"grad_sample_mode=bk cannot clip the trainable parameters of layer {name or 'model'!r} "
                           f"({type(module).__name__}); it supports Linear, Conv2d, GroupNorm, LayerNorm and "
                           f"Embedding; use grad_sample_mode=vmap or freeze that layer")
        for p in own:
            if id(p) in seen:
                raise BadInput(f"grad_sample_mode=bk: layers {seen[id(p)]!r} and {name!r} share a parameter; "
                               f"use grad_sample_mode=vmap")
            seen[id(p)] = name
        layers.append((name, module))
    return layers


class BookKeepingClipping:
    """Leaves on each trainable parameter `p.grad`: the sum over the chunk's examples of
    their gradients (of each example's K-draw mean loss) clipped to norm `clip`.

    `strategy`: "auto" (per layer, the cheaper of ghost norm and materialised gradient),
    or "ghost" / "materialise" everywhere it applies (tests exercise both paths)."""

    def __init__(self, model: nn.Module, per_sample_loss: Callable, clip: float, multiplicity: int = 1,
                 strategy: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} not in {STRATEGIES}")
        self.model = self.module = model
        self.loss, self.clip, self.k, self.strategy = per_sample_loss, float(clip), int(multiplicity), strategy
        self.layers = trainable_layers(model)
        covered = {id(p) for _, m in self.layers for p in m.parameters(recurse=False)}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        missing = [p for p in self.trainable if id(p) not in covered]
        if missing:  # unreachable through named_modules (e.g. a parameter assigned oddly)
            raise BadInput("grad_sample_mode=bk: a trainable parameter belongs to no layer; use grad_sample_mode=vmap")
        self.last_norms: torch.Tensor | None = None  # the chunk's per-example norms (tests read them)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[_Layer], torch.Tensor]:
        """Forward, and one backward to the layer outputs that fills each layer's book; returns
        the books and the per-example (K-mean) losses."""
        k, b = self.k, len(x)
        xs, ys = (x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)) if k > 1 else (x, y)
        books = {m: _handler(m)(m, b, k, self.strategy) for _, m in self.layers}
        recorded = []

        def forward_hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            book = books[module]
            held = [book.capture(inputs, output)]
            # pop: the input is released as soon as its layer's gradient has been used
            output.register_hook(lambda g: book.add(held.pop(), g))
            recorded.append((module, output, output._version))

        handles = [m.register_forward_hook(forward_hook) for _, m in self.layers]
        try:
            losses = self.loss(self.model, xs, ys)
        finally:
            for h in handles:
                h.remove()
        if losses.shape != (len(xs),):
            raise RuntimeError(f"per-sample loss must have shape ({len(xs)},), got {tuple(losses.shape)}")
        for module, output, version in recorded:
            if output._version != version:
                raise BadInput(f"grad_sample_mode=bk: the output of a {type(module).__name__} layer is modified "
                               f"in place after it; use grad_sample_mode=vmap")
        outputs = [output for _, output, _ in recorded]
        del recorded
        if outputs:  # gradients at the layer outputs only: autograd forms no weight gradient
            torch.autograd.grad(losses.sum() / k, _sources(outputs), allow_unused=True)
        return list(books.values()), losses.detach().reshape(b, k).mean(1)

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Writes the chunk's clipped gradient sum to p.grad; returns the per-example losses."""
        books, losses = self.backward(x, y)
        sq = torch.zeros(len(x), dtype=torch.float32, device=losses.device)
        for book in books:
            if book.mat is not None or book.pairs or book.bias_pe is not None:
                sq = sq + book.sq_norms()
        norms = sq.sqrt()
        self.last_norms = norms
        c = (self.clip / (norms + 1e-6)).clamp(max=1.0)  # opacus' clipping factor
        for p in self.trainable:
            p.grad = None
        for book in books:
            if book.mat is not None or book.pairs or book.bias_pe is not None:
                book.write_clipped(c)
        for p in self.trainable:  # a layer the loss did not reach: zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return losses


def per_example_gradients(model: nn.Module, per_sample_loss: Callable, x: torch.Tensor, y: torch.Tensor,
                          multiplicity: int = 1, strategy: str = "materialise") -> dict[str, torch.Tensor]:
    """{parameter name: (B, *shape)} unclipped per-example gradients as book-keeping sees them
    (via the clipped-sum path with one-hot factors: slow, for checks on tiny inputs only)."""
    clipping = BookKeepingClipping(model, per_sample_loss, clip=math.inf, multiplicity=multiplicity,
                                   strategy=strategy)
    books, _ = clipping.backward(x, y)
    books = [book for book in books if book.mat is not None or book.pairs or book.bias_pe is not None]
    for book in books:
        book.sq_norms()
    names = {id(p): n for n, p in model.named_parameters()}
    out = {n: torch.zeros(len(x), *p.shape) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(x)):
        onehot = torch.zeros(len(x))
        onehot[i] = 1.0
        for p in clipping.trainable:
            p.grad = None
        for book in books:
            book.write_clipped(onehot)
        for p in clipping.trainable:
            if p.grad is not None:
                out[names[id(p)]][i] = p.grad.detach()
    for p in clipping.trainable:
        p.grad = None
    return out


def check_bookkeeping_covers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, per_sample_loss: Callable,
                             atol: float = 1e-5) -> None:
    """On NON-sensitive inputs: the per-example gradients book-keeping sees must add up to
    autograd's gradient of the summed loss; a parameter used outside its layer's forward (so
    invisible to the layer hooks) fails here, naming it."""
    import copy

    probe = copy.deepcopy(model)
    probe.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        seen = per_example_gradients(probe, per_sample_loss, x, y)
        torch.manual_seed(0)
        probe.zero_grad(set_to_none=True)
        per_sample_loss(probe, x, y).sum().backward()
    for name, p in probe.named_parameters():
        if p.requires_grad:
            full = p.grad if p.grad is not None else torch.zeros_like(p)
            if not torch.allclose(seen[name].sum(0), full, atol=atol, rtol=1e-4):
                raise BadInput(f"grad_sample_mode=bk: parameter {name!r} gets gradient from outside its layer's "
                               f"forward (or from a layer that mixes samples); use grad_sample_mode=vmap")

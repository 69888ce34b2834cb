"""Book-keeping clipping (grad_sample_mode=bk): each example's gradient norm and the clipped sum
from one backward, checked against one-at-a-time autograd with the example's K draws of fixed
randomness, on CVAE-like, U-Net-like, LoRA-wrapped and the real EDM and latent models, through
both the ghost-norm and the materialised path of every layer; and the DP-SGD step it drives."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsynth.errors import BadInput
from dpsynth.models.edm import EDMConfig, EDMDiffusion
from dpsynth.training.bookkeeping import BookKeepingClipping, check_bookkeeping_covers, per_example_gradients
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import FinetuneOptions, check_combination

CLIP = 0.3


class CVAELike(nn.Module):
    """Conv stride 2, GroupNorm, label Embedding, Linear, upsampling decoder ending in a conv to
    one channel; `noise` is the latent draw."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
        self.label = nn.Embedding(3, 6)
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.dec_fc = nn.Linear(6, 8 * 4 * 4)
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8),
                                 nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x, y, noise):
        h = torch.tanh(self.fc(self.enc(x).flatten(1)) + self.label(y))
        z = h + 0.5 * noise
        out = self.dec(torch.sigmoid(self.dec_fc(z)).view(-1, 8, 4, 4))
        return (out - x).pow(2).flatten(1).mean(1) + h.pow(2).mean(1)


class UNetLike(nn.Module):
    """Conv stride 2 with groups, dilation, reflect and 'same' padding, a 1x1 conv, GroupNorm,
    attention written with Linear layers on (B, T, C) (qkv reused twice), LayerNorm, and an
    Embedding looked up at several positions with repeats."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect")
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.same = nn.Conv2d(8, 8, 2, padding="same")
        self.norm = nn.GroupNorm(2, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.tokens = nn.Embedding(5, 8, padding_idx=0)
        self.skip = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def attend(self, t):
        q, k, v = self.qkv(self.ln(t)).chunk(3, dim=2)
        return self.proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v)

    def forward(self, x, y, noise):
        h = F.silu(self.conv_in(x + noise))
        h = self.norm(self.dil(self.down(h)))
        h = F.silu(self.same(h))
        b, c, hh, ww = h.shape
        t = h.reshape(b, c, hh * ww).transpose(1, 2)
        lookups = torch.stack([y, (y + 1) % 5, y, torch.zeros_like(y)], 1)  # repeats and the padding row
        t = t + self.tokens(lookups).mean(1, keepdim=True)
        t = t + self.attend(t)
        t = t + self.attend(t)  # the same Linear layers used twice
        h = self.skip(t.transpose(1, 2).reshape(b, c, hh, ww))
        out = self.out(F.interpolate(h, scale_factor=2.0))
        return (out - x).pow(2).flatten(1).mean(1)


class LoRALike(nn.Module):
    """Frozen base attention projections (the LDM names), peft LoRA adapters on them."""

    def __init__(self):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.to_q, self.to_k, self.to_v = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)
        for p in self.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=["to_q", "to_k", "to_v"],
                                           init_lora_weights="gaussian", lora_dropout=0.0, bias="none"), self)
        for name, p in self.named_parameters():
            if "lora_B" in name:  # B starts at zero: make every adapter's gradient non-trivial
                torch.nn.init.normal_(p, std=0.3)

    def forward(self, x, y, noise):
        t = x.flatten(2).transpose(1, 2)[..., :6] + noise.flatten(2).transpose(1, 2)[..., :6]  # (B, T, 6)
        a = torch.softmax(self.to_q(t) @ self.to_k(t).transpose(1, 2), -1) @ self.to_v(t)
        return self.head(a).squeeze(-1).pow(2).mean(1) + 0.1 * y.float()


def inputs(model_name, b, k):
    gen = torch.Generator().manual_seed(1)
    channels = 6 if model_name == "lora" else 1
    x = torch.randn(b, channels, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 1, 0][:b]) if model_name != "unet" else torch.tensor([1, 4, 2, 4, 3][:b])
    noises = torch.randn(k, channels if model_name != "cvae" else 6, *((8, 8) if model_name != "cvae" else ()),
                         generator=gen)
    return x, y, noises


def fixed_draw_loss(noises):
    """Row r uses draw r mod K: an example's K rows see the K fixed draws, alone or in a batch."""
    def loss(model, x, y):
        return model(x, y, noises[torch.arange(len(x)) % len(noises)])
    return loss


def build(name):
    torch.manual_seed(0)
    if name == "cvae":
        return CVAELike()
    if name == "unet":
        return UNetLike()
    if name == "lora":
        return LoRALike()
    model = EDMDiffusion(EDMConfig(resolution=8, channels=1, num_classes=3, width=4, ch_mult=(1, 2),
                                   num_res_blocks=1))
    for p in model.parameters():  # leave the zero-initialised start, so every layer has a gradient
        torch.nn.init.normal_(p, std=0.1)
    return model


def edm_loss(k):
    gen = torch.Generator().manual_seed(7)
    noises, sigmas = torch.randn(k, 1, 8, 8, generator=gen), torch.exp(torch.randn(k, generator=gen))

    def loss(model, x, y):
        idx = torch.arange(len(x)) % k
        return model(x, y, sigmas[idx], noises[idx])
    return loss


def one_at_a_time(model, loss, x, y, k):
    """Each example's gradient of its K-draw mean loss, by plain autograd, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(x)):
        mean_loss = loss(model, x[i:i + 1].repeat_interleave(k, 0), y[i:i + 1].repeat_interleave(k, 0)).mean()
        grads.append([g if g is not None else torch.zeros_like(p)
                      for g, p in zip(torch.autograd.grad(mean_loss, params, allow_unused=True), params)])
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    clipped = [sum(f * gs[j] for f, gs in zip(factors, grads)) for j in range(len(params))]
    return norms, clipped, grads


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ["cvae", "unet", "lora", "edm"])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
def test_norms_and_clipped_sum_equal_one_at_a_time_autograd(name, k, strategy):
    model = build(name)
    if name == "edm":
        x, y, loss = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 1]), edm_loss(k)
    else:
        x, y, noises = inputs(name, 4, k)
        loss = fixed_draw_loss(noises)
    norms, clipped, _ = one_at_a_time(model, loss, x, y, k)
    assert (norms > CLIP).any() and (norms > 0).all()  # clipping is active: a missing factor would show
    clipping = BookKeepingClipping(model, loss, CLIP, multiplicity=k, strategy=strategy)
    losses = clipping.compute(x, y)
    assert losses.shape == (4,)
    torch.testing.assert_close(clipping.last_norms, norms, rtol=1e-4, atol=1e-6)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (n, p), expected in zip(trainable, clipped):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_per_example_gradients_themselves_equal_autograd(strategy):
    """Not only the norms and the sum: each example's gradient (what both paths clip)."""
    model = build("unet")
    x, y, noises = inputs("unet", 3, 2)
    loss = fixed_draw_loss(noises)
    _, _, reference = one_at_a_time(model, loss, x, y, 2)
    seen = per_example_gradients(model, loss, x, y, multiplicity=2, strategy=strategy)
    for j, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
        for i in range(3):
            torch.testing.assert_close(seen[n][i], reference[i][j], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["dp-lora", "dp-ldm"])
def test_latent_methods_trainable_parts_match_autograd(name):
    from dpsynth.methods import get_method
    from dpsynth.training.options import resolve_options

    arch = dict(ae_width=4, ae_ch_mult=(1, 2), ae_res_blocks=1, z_channels=2, width=8, ch_mult=(1, 2),
                num_res_blocks=1, attn_levels=(1, 2), head_channels=4, context_dim=6, timesteps=50)
    method = get_method(name, arch)
    torch.manual_seed(0)
    given = FinetuneOptions(train_opts={"lora_rank": 2} if name == "dp-lora" else None)
    model = method.prepare_private(method.build_generator(8, 1, 3), resolve_options(method, given))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    k = 2
    gen = torch.Generator().manual_seed(3)
    moments = torch.randn(3, 4, 4, 4, generator=gen)
    t, noise, post = torch.randint(0, 50, (k,), generator=gen), torch.randn(k, 2, 4, 4, generator=gen), \
        torch.randn(k, 2, 4, 4, generator=gen)

    def loss(m, x, y):
        idx = torch.arange(len(x)) % k
        return m(x, y, t[idx], noise[idx], post[idx])

    y = torch.tensor([0, 2, 1])
    norms, clipped, _ = one_at_a_time(model, loss, moments, y, k)
    clipping = BookKeepingClipping(model, loss, CLIP, multiplicity=k)
    clipping.compute(moments, y)
    torch.testing.assert_close(clipping.last_norms, norms, rtol=1e-4, atol=1e-6)
    for (n, p), expected in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], clipped):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=n)


def test_unsupported_trainable_layer_is_refused_by_type_and_a_frozen_one_is_fine():
    class WithConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(1, 2, 3)
            self.fc = nn.Linear(2, 1)

        def forward(self, x, y):
            return self.fc(self.c(x).mean(2)).squeeze(1)

    model = WithConv1d()
    with pytest.raises(BadInput, match=r"layer 'c' \(Conv1d\)"):
        BookKeepingClipping(model, lambda m, x, y: m(x, y), 1.0)
    model.c.requires_grad_(False)
    clipping = BookKeepingClipping(model, lambda m, x, y: m(x, y), 1.0)
    clipping.compute(torch.randn(3, 1, 5), torch.zeros(3))
    assert model.fc.weight.grad is not None and model.c.weight.grad is None


def test_a_parameter_used_outside_its_layer_is_caught_on_random_inputs():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, y):
            return (self.fc(x) + F.linear(x, self.fc.weight)).pow(2).sum(1)  # the second use has no hook

    x, y = torch.randn(2, 3), torch.zeros(2)
    with pytest.raises(BadInput, match="'fc.weight'"):
        check_bookkeeping_covers(Reused(), x, y, lambda m, a, b: m(a, b))
    check_bookkeeping_covers(CVAELike(), *inputs("cvae", 2, 1)[:2],
                             fixed_draw_loss(inputs("cvae", 2, 1)[2]))


def test_noisy_step_with_multiplicity_and_chunks_equals_opacus_hooks():
    """The whole mechanism: with the same seed (same Poisson batches, diffusion draws and
    Gaussian noise), bk's DP-SGD run (K = 2, physical chunks, noise on) equals opacus' hooks."""
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (12,))
    results = {}
    for mode in ("hooks", "bk"):
        model = build("edm")
        torch.manual_seed(5)
        train_dp(model, x, y, lambda m, a, b: m(a, b), plan=DPSGDPlan(dataset_size=12, batch_size=6, epochs=1),
                 noise_multiplier=0.7, opts=FinetuneOptions(clip=0.05, lr=1.0, grad_sample_mode=mode,
                                                            noise_multiplicity=2, physical_batch_size=4,
                                                            base_optimizer="sgd"))
        results[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in build("edm").parameters()])
    assert not torch.allclose(results["bk"], start)
    torch.testing.assert_close(results["bk"], results["hooks"], rtol=1e-4, atol=1e-5)


def test_an_empty_poisson_batch_still_takes_its_noise_only_step(monkeypatch):
    """Every accounted step releases noise, even when the Poisson batch drew no image."""
    from dpsynth.training.distributed import PoissonBatches

    real_iter = PoissonBatches.__iter__

    def empty_batches(self):  # the same sampler's batches, emptied: the shapes of a zero draw
        for xb, yb in real_iter(self):
            yield xb[:0], yb[:0]

    monkeypatch.setattr(PoissonBatches, "__iter__", empty_batches)
    model = build("cvae")
    x, y, noises = inputs("cvae", 4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    train_dp(model, x, y, fixed_draw_loss(noises), plan=DPSGDPlan(4, 2, 1), noise_multiplier=1.0,
             opts=FinetuneOptions(clip=1.0, lr=0.1, grad_sample_mode="bk", base_optimizer="sgd"))
    moved = [p.detach() - s for p, s in zip(model.parameters(), start)]
    # two steps of noise only: each coordinate moved by lr * N(0, (sigma C)^2) / (N q) per step
    assert all((m != 0).all() for m in moved)


def test_options_allow_multiplicity_and_refuse_efsgd():
    check_combination(FinetuneOptions(grad_sample_mode="bk", noise_multiplicity=4))
    with pytest.raises(BadInput, match="grad_sample_mode=bk cannot be used with private_optimizer=efsgd"):
        check_combination(FinetuneOptions(grad_sample_mode="bk", private_optimizer="efsgd", feedback_clip=1.0))

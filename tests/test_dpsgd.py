"""The DP-SGD step computes what the ledger describes: per-sample clipping, checked
against gradients computed one sample at a time."""

import pytest
import torch
from torch import nn

from dpsynth.errors import BadInput
from dpsynth.models.cvae import ConditionalVAE, CVAEConfig
from dpsynth.training.dpsgd import DPSGDPlan, check_dp_compatible, train_dp
from dpsynth.training.options import FinetuneOptions


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.emb = nn.Embedding(4, 3)
        self.fc = nn.Linear(3 * 8 * 8, 1)

    def forward(self, x, y):
        h = torch.relu(self.norm(self.conv(x)) + self.emb(y)[:, :, None, None])
        return self.fc(h.flatten(1)).squeeze(1) ** 2  # per-sample loss


def per_sample(model, x, y):
    return model(x, y)


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_one_step_equals_mean_of_clipped_per_sample_gradients(mode):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    reference_model = Tiny()
    start = {k: v.clone() for k, v in reference_model.state_dict().items()}
    clip = 0.05
    clipped_sum = [torch.zeros_like(p) for p in reference_model.parameters()]
    for i in range(16):
        reference_model.zero_grad()
        per_sample(reference_model, x[i:i + 1], y[i:i + 1]).sum().backward()
        grads = [p.grad.clone() for p in reference_model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, clip / (norm.item() + 1e-6))
        assert norm > clip  # clipping is active, so the test would notice it missing
        for acc, g in zip(clipped_sum, grads):
            acc += g * scale

    model = Tiny()
    model.load_state_dict(start)
    # q = 1 includes every image; noise 0 isolates the clipping; SGD lr 1 exposes the gradient.
    trained = train_dp(model, x, y, per_sample, plan=DPSGDPlan(16, 16, 1), noise_multiplier=0.0,
                       opts=FinetuneOptions(clip=clip, lr=1.0, grad_sample_mode=mode, base_optimizer="sgd"))
    for (name, before), p, acc in zip(start.items(), trained.parameters(), clipped_sum):
        assert torch.allclose(before - p.detach(), acc / 16, atol=1e-5), name


def test_batchnorm_is_refused_before_dp_training():
    with pytest.raises(BadInput, match="not DP-SGD compatible"):
        check_dp_compatible(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    check_dp_compatible(ConditionalVAE(CVAEConfig(resolution=8, width=8, hidden=16)))


def test_plan_counts_steps_and_sample_rate():
    plan = DPSGDPlan(dataset_size=60000, batch_size=512, epochs=3)
    assert plan.steps_per_epoch == 117
    assert plan.sample_rate == pytest.approx(1 / 117)
    assert plan.steps == 351
    with pytest.raises(BadInput):
        DPSGDPlan(dataset_size=10, batch_size=20, epochs=1)


def test_freed_host_memory_is_handed_back_on_glibc():
    import platform

    from dpsynth.training.memory import release_freed_memory

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("malloc_trim is glibc's")
    assert release_freed_memory()  # the fine-tune's resident set depends on it (training/memory.py)

"""Privacy safety guards: models whose per-sample gradients are missing or mix samples are
refused before DP-SGD; the sampler DP-SGD uses is Poisson at the accounted rate, checked
both by type and by the batch sizes it actually draws."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpsynth.errors import BadInput
from dpsynth.methods import get_method
from dpsynth.training.distributed import PoissonBatches
from dpsynth.training.dp_guards import check_per_sample_gradients, check_poisson_sampler
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import FinetuneOptions


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.norm, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.norm(self.hidden(x))).squeeze(1)


class BatchMean(nn.Module):
    """Subtracts the batch mean: no BatchNorm in sight, but samples still mix."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 4)

    def forward(self, x):
        h = self.hidden(x)
        return (h - h.mean(0)).pow(2).sum(1)


class ParameterUsedOutsideItsLayer(nn.Module):
    """`side.weight` is used directly, so opacus' per-layer hooks never see it."""

    def __init__(self):
        super().__init__()
        self.hidden, self.side = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return (self.hidden(x) @ self.side.weight).pow(2).sum(1)


def loss(model, x, y):
    return model(x)


@pytest.mark.parametrize("cls,message", [(WithBatchNorm, "not DP-SGD compatible"),
                                         (BatchMean, "depends on the other samples"),
                                         (ParameterUsedOutsideItsLayer, "'side.weight' .* no per-sample gradient")])
def test_models_that_break_per_sample_clipping_are_refused(cls, message):
    torch.manual_seed(0)
    with pytest.raises(BadInput, match=message):
        check_per_sample_gradients(cls(), torch.randn(4, 4), torch.zeros(4), loss)


def test_the_pipeline_generator_passes_and_the_global_rng_is_untouched():
    method = get_method("dp-cvae")
    model = method.build_generator(8, 1, 10)
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    check_per_sample_gradients(model, x, torch.tensor([0, 3, 9]), method.per_sample_loss)
    assert torch.equal(torch.rand(3), expected)


def test_batchnorm_reaching_train_dp_fails_before_any_step():
    with pytest.raises(BadInput, match="not DP-SGD compatible"):
        train_dp(WithBatchNorm(), torch.randn(20, 4), torch.zeros(20), loss, plan=DPSGDPlan(20, 5, 1),
                 noise_multiplier=1.0, opts=FinetuneOptions(clip=1.0, lr=0.1, grad_sample_mode="hooks"))


def test_sampler_type_rate_steps_and_shard_are_checked():
    x, y = torch.zeros(100, 2), torch.zeros(100)
    check_poisson_sampler(PoissonBatches(x, y, sample_rate=0.1, steps=10), 0.1, 10)
    with pytest.raises(RuntimeError, match="not Poisson"):
        check_poisson_sampler(DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True), 0.1, 10)
    with pytest.raises(RuntimeError, match="differs from the accounted"):
        check_poisson_sampler(PoissonBatches(x, y, sample_rate=0.2, steps=10), 0.1, 10)
    with pytest.raises(RuntimeError, match="the plan accounts for 10"):
        check_poisson_sampler(PoissonBatches(x, y, sample_rate=0.1, steps=9), 0.1, 10)
    with pytest.raises(RuntimeError, match="this is process 0 of 1"):  # another rank's shard
        check_poisson_sampler(PoissonBatches(x, y, sample_rate=0.1, steps=10, rank=1, world_size=2), 0.1, 10)


def test_batches_train_dp_draws_have_poisson_sizes():
    # Poisson sampling at rate q: each logical batch size ~ Binomial(N, q). A fixed-size or
    # shuffled loader would give variance 0; sampling without the right rate shifts the mean.
    n, plan = 2000, DPSGDPlan(dataset_size=2000, batch_size=100, epochs=10)
    sizes = []

    def recording_loss(model, x, y):
        sizes.append(len(x))
        return model(x).pow(2).squeeze(1)

    torch.manual_seed(0)
    train_dp(nn.Linear(2, 1), torch.randn(n, 2), torch.zeros(n), recording_loss, plan=plan, noise_multiplier=1.0,
             opts=FinetuneOptions(clip=1.0, lr=0.01, grad_sample_mode="hooks", base_optimizer="sgd"))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    q, steps = plan.sample_rate, plan.steps
    assert len(sizes) == steps  # no empty batch at this size, so one loss call per step
    mean_se = math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.mean() - n * q) < 4 * mean_se
    assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.4  # chi-square(199)/199 lies in this range w.p. > 0.999


class _BatchMeanGenerator(nn.Module):
    """A generator whose loss subtracts the batch mean: it must never reach DP-SGD."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encode = nn.Linear(cfg.resolution * cfg.resolution * cfg.channels, 4)

    def forward(self, x, y):
        h = self.encode(x.flatten(1))
        return (h - h.mean(0)).pow(2).sum(1)


def test_finetune_refuses_a_sample_mixing_generator_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from dpsynth.cli.main import main
    from dpsynth.methods import METHODS
    from dpsynth.methods.cvae import DPCVAE

    class Mixing(DPCVAE):
        name = "test-mixing"
        model_class = _BatchMeanGenerator

    monkeypatch.setitem(METHODS, Mixing.name, Mixing)
    code = main(["finetune", "--sensitive", "digits", "--limit", "100", "--public-size", "1797", "--method", "test-mixing", "--eps", "1",
                 "--epochs", "1", "--batch-size", "100", "--grad-sample-mode", "hooks", "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "depends on the other samples" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before the ledger event: nothing spent

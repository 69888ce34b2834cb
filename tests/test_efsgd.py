"""EFSGD (DiceSGD error feedback): the update, the error state, the noise and the ledger,
checked against numbers computed by hand from the algorithm's equations and against a
direct prv-accountant call."""

import math

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from torch import nn

from cli_helpers import snapshot
from dpsynth.cli.main import main
from dpsynth.errors import BadInput
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import FinetuneOptions
from dpsynth.training.checkpoint import Checkpointing
from dpsynth.privacy.plans import private_optimizer_events
from dpsynth.training.efsgd import ERROR_KEY, EFSGDOptimizer
from dpsynth.training.private_optimizer import make_private_optimizer


class TwoWeights(nn.Module):
    """loss_i = 0.5 (a x_i1 + b x_i2 - y_i)^2 with a and b in separate parameters, so the
    feedback clip must take the norm over both."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([a], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([b], dtype=torch.float64))


X = [(1.0, 2.0), (3.0, -1.0), (0.5, 0.5)]
Y = [1.0, -2.0, 0.3]


def hand_gradients(a, b):
    grads = []
    for (x1, x2), y in zip(X, Y):
        r = a * x1 + b * x2 - y
        grads.append(np.array([r * x1, r * x2]))
    return grads


def hand_clip(v, c):
    """opacus' per-sample clip: factor min(1, C / (norm + 1e-6))."""
    return v * min(1.0, c / (np.linalg.norm(v) + 1e-6))


def set_grad_samples(model, grads):
    model.a.grad_sample = torch.tensor([[g[0]] for g in grads], dtype=torch.float64)
    model.b.grad_sample = torch.tensor([[g[1]] for g in grads], dtype=torch.float64)


def test_two_steps_match_the_equations_by_hand():
    c1, c2, lr, expected_batch = 1.0, 0.5, 0.1, 3.0
    model = TwoWeights(0.5, -0.3)
    opt = EFSGDOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=c1,
                         expected_batch_size=expected_batch, feedback_clip=c2)
    theta, e = np.array([0.5, -0.3]), np.zeros(2)
    for step in range(2):
        grads = hand_gradients(*theta)
        clipped = sum(hand_clip(g, c1) for g in grads)
        norm_e = np.linalg.norm(e)
        feedback = e * min(1.0, c2 / norm_e) if norm_e > 0 else e  # clip(e, C2), exact
        v = (clipped + feedback) / expected_batch
        theta = theta - lr * v
        e = e + sum(grads) - clipped - feedback

        opt.zero_grad()
        set_grad_samples(model, grads)
        opt.step()
        got_v = np.array([model.a.grad.item(), model.b.grad.item()])
        np.testing.assert_allclose(got_v, v, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose([model.a.item(), model.b.item()], theta, rtol=1e-12, atol=1e-12)
        got_e = np.array([opt.state[model.a][ERROR_KEY].item(), opt.state[model.b][ERROR_KEY].item()])
        np.testing.assert_allclose(got_e, e, rtol=1e-12, atol=1e-12)
        if step == 1:  # the fed-back error was clipped, jointly over a and b, to exactly C2
            assert norm_e > c2
            assert np.linalg.norm(feedback) == pytest.approx(c2, rel=1e-12)
    assert np.linalg.norm(e) > 1.0  # clipping happened, so there was an error to keep


def test_error_stays_zero_without_clipping_and_virtual_steps_add_up():
    model = TwoWeights(0.0, 0.0)
    opt = EFSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=10.0,
                         expected_batch_size=3.0, feedback_clip=1.0)
    for _ in range(3):
        grads = hand_gradients(model.a.item(), model.b.item())
        assert max(np.linalg.norm(g) for g in grads) < 10.0
        opt.zero_grad()
        set_grad_samples(model, grads)
        opt.step()
        assert opt.state[model.a][ERROR_KEY].item() == 0.0 and opt.state[model.b][ERROR_KEY].item() == 0.0

    # A logical batch in two physical chunks (opacus' virtual step) = one batch at once.
    grads = hand_gradients(0.2, 0.1)
    results = []
    for chunks in ([grads], [grads[:2], grads[2:]]):
        model = TwoWeights(0.2, 0.1)
        opt = EFSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                             expected_batch_size=3.0, feedback_clip=0.5)
        for i, chunk in enumerate(chunks):
            opt.zero_grad()
            set_grad_samples(model, chunk)
            opt.signal_skip_step(do_skip=i < len(chunks) - 1)
            opt.step()
        results.append((model.a.item(), model.b.item(), opt.state[model.a][ERROR_KEY].item()))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)

    # An empty Poisson batch: a noise-only step that still pays back clip(e, C2).
    model = TwoWeights(0.5, -0.3)
    opt = EFSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                         expected_batch_size=3.0, feedback_clip=0.5)
    set_grad_samples(model, hand_gradients(0.5, -0.3))
    opt.step()
    e = np.array([opt.state[model.a][ERROR_KEY].item(), opt.state[model.b][ERROR_KEY].item()])
    opt.zero_grad()
    model.a.grad_sample = torch.zeros((0, 1), dtype=torch.float64)
    model.b.grad_sample = torch.zeros((0, 1), dtype=torch.float64)
    opt.step()
    feedback = e * 0.5 / np.linalg.norm(e)
    np.testing.assert_allclose([model.a.grad.item(), model.b.grad.item()], feedback / 3.0, rtol=1e-12)
    np.testing.assert_allclose([opt.state[model.a][ERROR_KEY].item(), opt.state[model.b][ERROR_KEY].item()],
                               e - feedback, rtol=1e-12)


def test_noise_std_is_sqrt2_sigma_c1():
    torch.manual_seed(0)
    sigma, c1, batch = 0.7, 2.0, 4.0
    weight = nn.Parameter(torch.zeros(200_000))
    opt = make_private_optimizer("efsgd", torch.optim.SGD([weight], lr=0.0), noise_multiplier=sigma, clip=c1,
                                 expected_batch_size=batch, feedback_clip=0.3)
    weight.grad_sample = torch.zeros((5, 200_000))
    opt.step()
    draws = weight.grad * batch  # the noise on the clipped sum
    expected = math.sqrt(2.0) * sigma * c1
    assert float(draws.mean()) == pytest.approx(0.0, abs=4 * expected / math.sqrt(draws.numel()))
    assert float(draws.std()) == pytest.approx(expected, rel=0.01)
    assert opt.noise_std == pytest.approx(expected)


def test_bad_feedback_clip_is_refused():
    weight = nn.Parameter(torch.zeros(3))
    for bad in (None, 0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(BadInput):
            EFSGDOptimizer(torch.optim.SGD([weight], lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=2.0, feedback_clip=bad)


class Stochastic(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x, y):
        h = torch.tanh(self.hidden(x + 0.1 * torch.randn_like(x)))
        return 5.0 * (self.out(h).squeeze(1) - y).pow(2)  # large gradients: clipping is active


def _loss(model, x, y):
    return model(x, y)


class _Stop(Exception):
    pass


def _train(plan, x, y, resume=None, stop_at=None):
    torch.manual_seed(0)
    model = Stochastic()
    captured = {}

    def on_step(step, snapshot_state):
        if step == stop_at:
            captured["state"] = snapshot_state()
            raise _Stop

    if resume is None:
        torch.manual_seed(1234)
    try:
        opts = FinetuneOptions(clip=0.1, lr=0.05, base_optimizer="adam", grad_sample_mode="vmap",
                               private_optimizer="efsgd", feedback_clip=0.05)
        return train_dp(model, x, y, _loss, plan=plan, noise_multiplier=0.8, opts=opts,
                        checkpoints=Checkpointing(resume=resume, on_step=on_step)), None
    except _Stop:
        return None, captured["state"]


def test_error_state_survives_checkpoint_and_resume():
    torch.manual_seed(7)
    x, y = torch.randn(60, 6), torch.randn(60)
    plan = DPSGDPlan(dataset_size=60, batch_size=20, epochs=2)
    full, _ = _train(plan, x, y)
    _, state = _train(plan, x, y, stop_at=4)
    errors = [v[ERROR_KEY] for v in state["optimizer"]["state"].values()]
    assert len(errors) == 4 and sum(float(e.norm()) for e in errors) > 0  # e is in the checkpoint
    resumed, _ = _train(plan, x, y, resume=state)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # Losing e changes the continuation: the test would notice a restore that drops it.
    for v in state["optimizer"]["state"].values():
        v[ERROR_KEY] = torch.zeros_like(v[ERROR_KEY])
    other, _ = _train(plan, x, y, resume=state)
    assert not torch.equal(other.out.weight, full.out.weight)


def test_efsgd_events_cover_both_halves_of_the_noise():
    events = private_optimizer_events("efsgd", "finetune", noise_multiplier=1.5, sample_rate=0.1, steps=30, clip=2.0, feedback_clip=0.25)
    gaussian, poisson = events
    assert (gaussian.mechanism, poisson.mechanism) == ("gaussian", "poisson_gaussian")
    # Half the variance (std sigma*C1) for each: sensitivities 2*C2 and C1.
    assert gaussian.noise_multiplier == pytest.approx(1.5 * 2.0 / (2 * 0.25))
    assert poisson.noise_multiplier == 1.5 and poisson.sample_rate == 0.1
    assert gaussian.steps == poisson.steps == 30


COMMON = ["--method", "dp-cvae", "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000", "--resolution", "8"]


def test_finetune_with_efsgd_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["finetune", "--run", str(run), *COMMON, "--eps", "10", "--epochs", "1", "--batch-size", "50",
                 "--optimizer", "efsgd", "--feedback-clip", "0.05", "--json"])
    assert code == 0, capsys.readouterr().err
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    assert [(e["stage"], e["mechanism"]) for e in events] == [("finetune", "gaussian"),
                                                             ("finetune", "poisson_gaussian")]
    gaussian, poisson = events
    config = manifest["stages"]["finetune"]["config"]
    sigma, c1 = poisson["noise_multiplier"], config["clip"]
    assert config["private_optimizer"] == "efsgd" and config["feedback_clip"] == 0.05
    assert config["grad_sample_mode"] == "vmap"  # bk is the method's default; EFSGD needs per-example grads
    # ... and the stage says so instead of swapping silently
    assert any("grad_sample_mode=vmap" in note and "bk" in note for note in config["option_notes"])
    assert config["noise_std"] == pytest.approx(math.sqrt(2) * sigma * c1)
    assert gaussian["noise_multiplier"] == pytest.approx(sigma * c1 / (2 * 0.05))
    assert poisson["sample_rate"] == pytest.approx(1 / 6) and poisson["steps"] == gaussian["steps"] == 6
    assert "C2=0.05" in poisson["note"]
    # Independent accounting: prv-accountant directly on both mechanisms.
    delta = manifest["privacy"]["delta"]
    acc = PRVAccountant(prvs=[GaussianMechanism(gaussian["noise_multiplier"]),
                              PoissonSubsampledGaussianMechanism(poisson["sample_rate"], sigma)],
                        max_self_compositions=[6, 6], eps_error=0.01, delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, [6, 6])
    reported = manifest["privacy"]["epsilon"]
    assert estimate - 1e-6 <= reported <= upper + 0.02
    assert reported <= 10.0
    assert (run / "generator.pt").exists()


@pytest.mark.parametrize("flags", [
    ["--optimizer", "foo"],
    ["--optimizer", "efsgd", "--feedback-clip", "0"],
    ["--optimizer", "efsgd", "--grad-sample-mode", "ghost"],
    ["--feedback-clip", "0.1"],  # the method's optimizer is dpsgd
    ["--optimizer", "dpsgd", "--feedback-clip", "0.1"],
])
def test_bad_optimizer_flags_exit_2_and_write_nothing(tmp_path, capsys, flags):
    before = snapshot(tmp_path)
    code = main(["finetune", "--run", str(tmp_path / "run"), *COMMON, "--eps", "10", "--epochs", "1", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert ("optimizer" in err or "feedback-clip" in err or "ghost" in err), err
    assert snapshot(tmp_path) == before


def _gaussian_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def test_feedback_is_not_covered_by_a_subsampled_event_but_is_by_ours():
    """Why EFSGD has a non-subsampled event: an added example z whose gradient is far above
    C1 leaves a large error e, and clip(e, C2) is paid back at EVERY later step, sampled or
    not. A likelihood-ratio test on the sum of released updates then beats the bound of
    PoissonGaussian(sigma, q, T) with DiceSGD's noise sqrt(1 + 2 C2/C1) sigma C1 by orders of
    magnitude; the same test stays within the bound of our two events."""
    c1 = c2 = 1.0
    q, steps, delta, first, g = 0.1, 100, 1e-5, 10, 1000.0
    # The release under D (z first sampled at step `first`, others have zero gradient) minus
    # the release under D' (all zero gradients, e = 0), without noise, from the optimizer itself.
    weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = EFSGDOptimizer(torch.optim.SGD([weight], lr=0.0), noise_multiplier=0.0, max_grad_norm=c1,
                         expected_batch_size=10.0, feedback_clip=c2)
    shift = 0.0
    for t in range(1, steps + 1):
        opt.zero_grad()
        weight.grad_sample = torch.full((1, 1), g, dtype=torch.float64) if t == first else \
            torch.zeros((0, 1), dtype=torch.float64)
        opt.step()
        shift += weight.grad.item() * 10.0
    assert shift == pytest.approx(c1 + (steps - first) * c2)  # z's C1 once, then C2 at each later step
    # z is first sampled at or before `first` with probability 1 - (1-q)^first; the feedback only grows then.
    p_early = 1 - (1 - q) ** first

    def violation(noise_std_on_sum: float, epsilon: float) -> float:
        """max over thresholds of TPR - (e^eps FPR + delta) of the test 'sum of released > tau'."""
        sd = math.sqrt(steps) * noise_std_on_sum
        worst = -1.0
        for k in range(1, 400):
            tau = k * sd / 40
            fpr = _gaussian_tail(tau / sd)
            tpr = p_early * _gaussian_tail((tau - (steps - first) * c2) / sd)
            worst = max(worst, tpr - (math.exp(epsilon) * fpr + delta))
        return worst

    sigma = 1.0
    acc = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q, sigma)], max_self_compositions=[steps],
                        eps_error=0.01, delta_error=delta / 1000)
    eps_subsampled = acc.compute_epsilon(delta, [steps])[2]
    dicesgd_std = math.sqrt(1 + 2 * c2 / c1) * sigma * c1
    assert violation(dicesgd_std, eps_subsampled) > 0.2  # the subsampled claim is false here

    # Our ledger for sigma = 20: both events, composed by prv-accountant directly.
    ours = private_optimizer_events("efsgd", "finetune", noise_multiplier=20.0, sample_rate=q, steps=steps, clip=c1, feedback_clip=c2)
    acc = PRVAccountant(prvs=[GaussianMechanism(ours[0].noise_multiplier),
                              PoissonSubsampledGaussianMechanism(q, 20.0)],
                        max_self_compositions=[steps, steps], eps_error=0.01, delta_error=delta / 1000)
    eps_ours = acc.compute_epsilon(delta, [steps, steps])[2]
    assert violation(math.sqrt(2.0) * 20.0 * c1, eps_ours) <= 0.0


def test_finetune_efsgd_killed_after_a_checkpoint_resumes_under_its_two_events(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from dpsynth.pipeline.rundir import LOCK, RunDir

    run = tmp_path / "run"
    args = ["finetune", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "dp-cvae", "--eps", "4",
            "--epochs", "2", "--batch-size", "100", "--optimizer", "efsgd", "--checkpoint-every", "1", "--quiet",
            "--json", "--run", str(run)]
    # fsyncs: manifest (stage begins), its two events, then checkpoint 1 (file, hash, pointer), and
    # the 7th is inside checkpoint 2: killed there, step 1's checkpoint is the durable one.
    fault = Path(__file__).with_name("fault_inject.py")
    result = subprocess.run([sys.executable, str(fault), "7", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    before = RunDir.open(run)
    events = before.events()
    assert [e.mechanism for e in events] == ["gaussian", "poisson_gaussian"]
    assert before.manifest["stages"]["finetune"]["checkpoint"]["step"] == 1
    (run / LOCK).unlink()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    done = RunDir.open(run)
    assert done.stage_done("finetune") and done.events() == events  # no new event for the same steps
    assert done.manifest["stages"]["finetune"]["resumed"][-1]["from_step"] == 1

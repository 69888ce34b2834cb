"""The three selection protocols: rules on scripted accuracies, the noisy-val mechanism against
closed forms and an independent PRV computation, and test-set access order over a real training run.

References: numpy's first-argmax of the scripted lists, the Laplace/Gaussian moments
(E|X| = b; std = s), basic composition (K counts at eps/K are eps-DP), prv-accountant
called directly, and an audited test Dataset that logs every read.
"""

import math

import numpy as np
import pytest
import torch
from prv_accountant import GaussianMechanism, LaplaceMechanism, PRVAccountant

from dpsynth.errors import BadInput
from dpsynth.evaluation.classifiers import published_options
from dpsynth.evaluation.selection import DP_SAFE, NOISY_VAL, TEST_SET, best_epoch
from dpsynth.mechanisms.noisy_val import add_noise, noisy_scores
from dpsynth.evaluation.classifier_fit import train_with_rules
from dpsynth.evaluation.results import NoisyVal
from dpsynth.evaluation.utility import evaluate_protocols, parse_classifiers
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent, LaplaceEvent
from dpsynth.mechanisms.noisy_val import charge_event, noisy_val_scale
from test_evaluation import AuditedTestSet, quadrant_images

DELTA = 1e-5


def test_best_epoch_is_the_first_maximum():
    for scores in ([0.5, 0.7, 0.7, 0.6], [0.9, 0.1], [0.1, 0.2, 0.3], [0.4, 0.4, 0.4]):
        assert best_epoch(scores) == int(np.argmax(scores)) + 1
    with pytest.raises(BadInput):
        best_epoch([])
    with pytest.raises(BadInput):
        best_epoch([0.1, float("nan")])


def test_each_rule_keeps_the_weights_of_its_scripted_best_epoch():
    """Three rules score the same trajectory with scripted values; each must keep its own epoch's weights."""
    x, y = quadrant_images(64, seed=7)
    scripted = {
        DP_SAFE: [0.50, 0.70, 0.70, 0.60],  # tie: the earlier epoch (2) wins
        TEST_SET: [0.60, 0.65, 0.80, 0.90],  # keeps rising: epoch 4
    }
    # noisy-val: raw holdout counts of 40 images with tiny noise cannot reorder them: epoch 1
    raw_counts = [33, 30, 20, 25]
    scripted[NOISY_VAL] = noisy_scores(raw_counts, 40, "laplace", 1e-6, np.random.default_rng(0))
    states = []

    def rule(name):
        values = iter(scripted[name])

        def score(model):
            if name == DP_SAFE:  # record the weights once per epoch
                states.append({k: v.clone() for k, v in model.state_dict().items()})
            return next(values)
        return score

    _, scores, best = train_with_rules(x, y.long(), 4, {name: rule(name) for name in scripted}, classifier="cnn",
                                       epochs=4, batch_size=16, lr=1e-2, seed=0, device="cpu")
    for name, values in scripted.items():
        assert scores[name] == values
        epoch = int(np.argmax(values)) + 1
        assert epoch == {DP_SAFE: 2, TEST_SET: 4, NOISY_VAL: 1}[name]
        kept, expected = best[name], states[epoch - 1]
        assert all(torch.equal(kept[k], expected[k]) for k in expected)
        other = states[(epoch % 4)]  # a different epoch's weights differ (training moved them)
        assert not all(torch.equal(kept[k], other[k]) for k in other if other[k].is_floating_point())


def test_laplace_event_and_scale_match_the_closed_form():
    k, eps = 12, 0.6
    event = charge_event(eps, "laplace", k, [], DELTA)
    assert isinstance(event, LaplaceEvent) and event.steps == k
    assert event.epsilon0 == pytest.approx(eps / k)
    assert noisy_val_scale(event, k) == pytest.approx(k / eps)  # b = K / eps for K sensitivity-1 counts
    composed = compose_epsilon([event], DELTA).upper
    reference = PRVAccountant(prvs=[LaplaceMechanism(mu=eps / k)], max_self_compositions=[k], eps_error=0.01,
                              delta_error=DELTA / 1000).compute_epsilon(delta=DELTA, num_self_compositions=[k])[2]
    assert composed == pytest.approx(reference, abs=1e-9)
    assert composed <= eps + 0.01  # never more than basic composition (plus PRV's stated error)
    with pytest.raises(BadInput, match="covers 12 counts"):
        noisy_val_scale(event, k + 1)


def test_gaussian_event_scale_grows_with_the_square_root_of_the_count():
    spent = [GaussianEvent("select-public", 5.0)]
    event = charge_event(0.5, "gaussian", 9, spent, DELTA)
    assert isinstance(event, GaussianEvent)
    assert noisy_val_scale(event, 9) == pytest.approx(3 * event.noise_multiplier)  # L2 sensitivity sqrt(9)
    before = compose_epsilon(spent, DELTA).upper
    after = PRVAccountant(prvs=[GaussianMechanism(5.0), GaussianMechanism(event.noise_multiplier)],
                          max_self_compositions=[1, 1], eps_error=0.01, delta_error=DELTA / 1000
                          ).compute_epsilon(delta=DELTA, num_self_compositions=[1, 1])[2]
    assert before < after <= before + 0.5 + 1e-9


def test_noise_draws_have_the_requested_scale():
    rng = np.random.default_rng(1)
    laplace = np.array([add_noise(100, "laplace", 4.0, rng) for _ in range(20000)]) - 100
    gauss = np.array([add_noise(100, "gaussian", 4.0, rng) for _ in range(20000)]) - 100
    assert np.mean(np.abs(laplace)) == pytest.approx(4.0, rel=0.03)  # E|Lap(b)| = b
    assert np.std(gauss) == pytest.approx(4.0, rel=0.03)
    with pytest.raises(BadInput, match="uniform"):
        add_noise(1, "uniform", 1.0, rng)


def test_parse_classifiers_and_published_sizes():
    assert parse_classifiers("dpimagebench") == ["resnet", "wrn", "resnext"]
    assert parse_classifiers("cnn, wrn,cnn") == ["cnn", "wrn"]
    with pytest.raises(BadInput, match="'vgg' is unknown"):
        parse_classifiers("cnn,vgg")
    assert published_options("wrn", 3, 32) == {"depth": 28, "width": 10}
    assert published_options("resnet", 3, 32) == {"depth": 164}
    assert published_options("wrn", 1, 28) == {}


@pytest.fixture(scope="module")
def noisy_data():
    syn_x, syn_y = quadrant_images(480, seed=3, noise=380.0)
    test_x, test_y = quadrant_images(160, seed=2, noise=380.0)
    hold_x, hold_y = quadrant_images(80, seed=9, noise=380.0)
    return syn_x, syn_y, test_x, test_y, hold_x, hold_y


def test_protocols_share_one_trajectory_and_test_selection_never_understates(noisy_data):
    syn_x, syn_y, test_x, test_y, hold_x, hold_y = noisy_data
    noisy = NoisyVal(hold_x, hold_y, "laplace", 1.0, np.random.default_rng(0))
    results = evaluate_protocols(syn_x, syn_y, lambda: (test_x, test_y), 4,
                                 protocols=[DP_SAFE, NOISY_VAL, TEST_SET], noisy_val=noisy, epochs=4, batch_size=64)
    flawed = results[TEST_SET]
    assert flawed.dp_safe is False and results[DP_SAFE].dp_safe and results[NOISY_VAL].dp_safe
    test_curve = flawed.scores["cnn"]  # real-test accuracy of every epoch's checkpoint
    assert flawed.accuracies["cnn"] == max(test_curve)
    for name in (DP_SAFE, NOISY_VAL):
        chosen = results[name].selected_epochs["cnn"]
        # Same checkpoints: a protocol's reported accuracy is that epoch's point on the test curve ...
        assert results[name].accuracies["cnn"] == pytest.approx(test_curve[chosen - 1], abs=1e-12)
        # ... so choosing on the test set can only overstate it.
        assert flawed.accuracies["cnn"] >= results[name].accuracies["cnn"]
    assert results[NOISY_VAL].holdout_size == 80
    assert results[DP_SAFE].train_size + results[DP_SAFE].val_size == 480


def test_no_test_read_before_the_single_final_pass(noisy_data):
    syn_x, syn_y, test_x, test_y, hold_x, hold_y = noisy_data
    log = []
    loads = []

    def load_test():
        loads.append(len(log))
        return AuditedTestSet(test_x, test_y, log), None

    noisy = NoisyVal(hold_x, hold_y, "gaussian", 2.0, np.random.default_rng(0))
    evaluate_protocols(syn_x, syn_y, load_test, 4, protocols=[DP_SAFE, NOISY_VAL], noisy_val=noisy, epochs=2,
                       batch_size=64, progress=lambda phase, done, total: log.append((phase, done, total)))
    fitting = [i for i, entry in enumerate(log) if entry[0].split()[0] in ("train", "validate")]
    reads = [i for i, entry in enumerate(log) if entry[0] == "read"]
    assert len(loads) == 1 and loads[0] > max(fitting)  # opened only once every checkpoint was chosen
    assert min(reads) > max(fitting)
    # One pass scores both protocols' checkpoints: every test item is read exactly once.
    assert sorted(log[i][1] for i in reads) == list(range(len(test_x)))


def test_noisy_val_needs_the_holdout_and_only_noisy_val_uses_it(noisy_data):
    syn_x, syn_y, test_x, test_y, hold_x, hold_y = noisy_data
    with pytest.raises(BadInput, match="hold-out"):
        evaluate_protocols(syn_x, syn_y, lambda: (test_x, test_y), 4, protocols=[NOISY_VAL], epochs=1)
    with pytest.raises(BadInput, match="noisy-val"):
        evaluate_protocols(syn_x, syn_y, lambda: (test_x, test_y), 4, protocols=["best-of-test"], epochs=1)
    assert math.isfinite(noisy_val_scale(GaussianEvent("evaluate", 2.0), 4))

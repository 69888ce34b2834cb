"""Tests for the DPImageBench downstream classifiers (resnet, wrn, resnext).

Parameter counts are checked against sums worked out by hand from the layer
shapes (comments below), not against the code's own arithmetic.
"""

import pytest
import torch

from dpsynth.errors import BadInput
from dpsynth.evaluation.classifiers import build_classifier, classifier_names, classifier_options

TINY = {
    "resnet": {"depth": 8, "base_width": 4},  # n = 1 block per stage
    "wrn": {"depth": 10, "width": 1},  # n = 1
    "resnext": {"depth": 11, "cardinality": 2, "bottleneck_width": 2},  # n = 1
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_dpimagebench_architectures():
    assert {"cnn", "resnet", "wrn", "resnext"} <= set(classifier_names())
    assert classifier_options("wrn") == {"depth": 40, "width": 4, "dropout": 0.3}
    assert classifier_options("cnn") == {}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [28, 32])
def test_tiny_forward_and_backward_shapes(name, channels, res):
    torch.manual_seed(0)
    net = build_classifier(name, channels, 10, res, **TINY[name])
    x = torch.randn(3, channels, res, res)
    out = net(x)
    assert out.shape == (3, 10)
    out.sum().backward()  # in-place activations must not break autograd
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", sorted(TINY))
def test_other_resolutions_via_adaptive_pooling(name):
    for res in (8, 20):
        assert build_classifier(name, 3, 4, res, **TINY[name])(torch.randn(2, 3, res, res)).shape == (2, 4)
    with pytest.raises(BadInput, match="resolution >= 8"):
        build_classifier(name, 3, 4, 7, **TINY[name])


def test_resnet110_parameter_count():
    # ResNet-110, 3 input channels, 10 classes, 1x1-conv+BN projection shortcuts:
    # stem conv 3*16*9 = 432, BN 32
    # stage 1: 18 blocks * (2*16*16*9 + 2*32 BN) = 18 * 4672 = 84,096
    # stage 2: first 16*32*9 + 32*32*9 + 128 BN + 16*32 + 64 = 14,528; 17 * (2*9216 + 128) = 315,520
    # stage 3: first 32*64*9 + 64*64*9 + 256 + 32*64 + 128 = 57,728; 17 * (2*36864 + 256) = 1,257,728
    # fc 64*10 + 10 = 650  ->  total 1,730,714 (He et al. report ~1.7M)
    hand = 1_730_714
    assert abs(n_params(build_classifier("resnet", 3, 10, 32)) - hand) <= 0.15 * hand


def test_wrn_40_4_parameter_count():
    # WRN-40-4: n = 6 pre-activation blocks per stage, widths 64/128/256, stem 16.
    # stem 3*16*9 = 432
    # stage 1: 32 + 16*64*9 + 128 + 64*64*9 + 16*64 = 47,264; 5 * (128 + 36864 + 128 + 36864) = 369,920
    # stage 2: 128 + 64*128*9 + 256 + 128*128*9 + 64*128 = 229,760; 5 * 295,424 = 1,477,120
    # stage 3: 256 + 128*256*9 + 512 + 256*256*9 + 128*256 = 918,272; 5 * 1,180,672 = 5,903,360
    # final BN 512, fc 256*10 + 10 = 2,570  ->  total 8,949,210 (WRN paper: 8.9M)
    hand = 8_949_210
    assert abs(n_params(build_classifier("wrn", 3, 10, 32)) - hand) <= 0.15 * hand


def test_resnext29_8x4d_parameter_count():
    # ResNeXt-29 8x4d: stem 64, 3 bottlenecks per stage, outputs 256/512/1024,
    # grouped widths 8*4*2^s = 32/64/128, 8 groups.
    # stem 3*64*9 + 128 = 1,856
    # stage 1: first 64*32 + 64 + 32*4*9 + 64 + 32*256 + 512 + (64*256 + 512) = 28,928; 2 * 18,176 = 36,352
    # stage 2: first 256*64 + 128 + 64*8*9 + 128 + 64*512 + 1024 + (256*512 + 1024) = 187,136; 2 * 71,424
    # stage 3: first 512*128 + 256 + 128*16*9 + 256 + 128*1024 + 2048 + (512*1024 + 2048) = 743,936; 2 * 283,136
    # fc 1024*10 + 10 = 10,250  ->  total 1,717,578
    hand = 1_717_578
    assert abs(n_params(build_classifier("resnext", 3, 10, 32)) - hand) <= 0.15 * hand


def test_resnext_8x64d_matches_paper_size():
    # DPImageBench's resnext.py yields 8x64d; Xie et al. (Table 7) give 34.4M parameters for it.
    got = n_params(build_classifier("resnext", 3, 10, 32, bottleneck_width=64))
    assert abs(got - 34.4e6) <= 0.02 * 34.4e6


def test_old_signature_and_cnn_still_work():
    assert build_classifier("cnn", 1, 10, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("resnet-9000", {}, "unknown classifier 'resnet-9000'"),
        ("wrn", {"depht": 10}, "unknown option 'depht'"),
        ("cnn", {"depth": 3}, "allowed: none"),
        ("wrn", {"depth": 11}, "6n\\+4"),
        ("resnet", {"depth": 100}, "6n\\+2"),
        ("resnext", {"depth": 28}, "9n\\+2"),
        ("resnext", {"cardinality": 0}, "cardinality"),
        ("wrn", {"depth": 10, "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_names_and_options(name, options, message):
    with pytest.raises(BadInput, match=message):
        build_classifier(name, 1, 10, 28, **options)

"""Downstream classifiers for the utility metric, looked up by name.

These train on synthetic data only (no privacy cost), so BatchNorm is fine.
"cnn" is a quick small network; "resnet", "wrn" and "resnext" are the three
architectures DPImageBench averages its utility over (its evaluator.py trains
ResNet, WideResNet and ResNeXt). All of them end in adaptive average pooling,
so any resolution >= 8 works (two stride-2 stages still leave a 2x2 map).
Depth and width are constructor options so tests can build tiny versions.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from dpsynth.errors import BadInput

# Below 8 px the last stride-2 stage would see a 1x1 or empty map.
MIN_RESOLUTION = 8


class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head: ~89% on Fashion-MNIST within 2 epochs, fast on CPU."""

    def __init__(self, in_channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = resolution // 2 // 2  # two floor-halving max-pools
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed (or preceded) by BatchNorm.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut for blocks that change shape; identity otherwise."""
    if cin == cout and stride == 1:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class _StagedClassifier(nn.Module):
    """The shape all three DPImageBench classifiers share: a stem, three stages of n blocks (the
    first block of stages 2 and 3 halves the resolution), global average pooling, a linear head."""

    def __init__(self, stem: list[nn.Module], cin: int, stage_widths, n: int, make_block, num_classes: int,
                 tail: tuple[nn.Module, ...] = ()):
        super().__init__()
        layers = list(stem)
        for stage, width in enumerate(stage_widths):
            for i in range(n):
                layers.append(make_block(stage, cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.features = nn.Sequential(*layers, *tail)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


# ---------------------------------------------------------------- ResNet (CIFAR)


class _BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            _conv3x3(cout, cout),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = _projection(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class CifarResNet(_StagedClassifier):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): 3x3 stem, 3 stages of n BasicBlocks, depth = 6n + 2.

    Defaults give ResNet-110 (n = 18, widths 16/32/64), DPImageBench's "resnet"
    (evaluation/classifier/resnet.py, depth=110, BasicBlock). Like that code,
    shape-changing shortcuts are 1x1 conv + BN projections (He's option B), so
    the count is ~1.73M parameters rather than the paper's 1.7M with zero-padding.
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 110, base_width: int = 16):
        widths = [base_width, 2 * base_width, 4 * base_width]
        stem = [_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        super().__init__(stem, widths[0], widths, (depth - 2) // 6,
                         lambda _stage, cin, cout, stride: _BasicBlock(cin, cout, stride), num_classes)


# ------------------------------------------------------------- Wide ResNet


class _WideBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv-[dropout]-BN-ReLU-conv (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            _conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            _conv3x3(cout, cout),
        )
        # WRN's shortcut is a bare 1x1 conv on the pre-activated input (no BN after it).
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        act = self.pre(x)
        skip = x if self.shortcut is None else self.shortcut(act)
        return self.body(act) + skip


class WideResNet(_StagedClassifier):
    """WRN-depth-width: 16-channel stem, 3 stages of n pre-activation blocks, depth = 6n + 4.

    Defaults give WRN-40-4 (widths 64/128/256, ~8.9M parameters, as in the WRN
    paper's Table), with dropout 0.3 between the convs as DPImageBench's
    evaluator builds its "wrn" (WideResNet(..., dropRate=0.3)).
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 40, width: int = 4, dropout: float = 0.3):
        widths = [16 * width, 32 * width, 64 * width]
        # Blocks are pre-activation, so a final BN-ReLU closes the last one.
        super().__init__([_conv3x3(in_channels, 16)], 16, widths, (depth - 4) // 6,
                         lambda _stage, cin, cout, stride: _WideBlock(cin, cout, stride, dropout), num_classes,
                         tail=(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True)))


# ------------------------------------------------------------------ ResNeXt


class _ResNeXtBlock(nn.Module):
    """Bottleneck 1x1 -> grouped 3x3 (cardinality groups) -> 1x1, post-activation (Xie et al. 2017, form C)."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, cardinality: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            _conv3x3(inner, inner, stride, groups=cardinality),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = _projection(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class CifarResNeXt(_StagedClassifier):
    """ResNeXt-depth (C x d): 64-channel stem, 3 stages of n bottlenecks, depth = 9n + 2.

    Follows the CIFAR template of Xie et al. 2017 (Sec. 5.3): stage outputs
    256/512/1024; the grouped conv of stage s has cardinality * bottleneck_width
    * 2^s channels. Defaults give ResNeXt-29 8x4d (cardinality 8, 4 channels
    per group), the configuration named for this project, ~1.72M parameters.
    DPImageBench's resnext.py (cardinality=8, widen_factor=4) computes its inner
    width as cardinality * out / widen_factor = 512/1024/2048, i.e. 8x64d
    (~34M parameters): pass bottleneck_width=64 to build that network.
    """

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 29, cardinality: int = 8, bottleneck_width: int = 4
    ):
        stem = [_conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]

        def block(stage, cin, cout, stride):
            inner = cardinality * bottleneck_width * 2**stage
            return _ResNeXtBlock(cin, inner, cout, stride, cardinality)

        super().__init__(stem, 64, (256, 512, 1024), (depth - 2) // 9, block, num_classes)


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan_out, as all three reference codes do), unit BN scale, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- factories


def _need_resolution(name: str, resolution: int, minimum: int) -> None:
    if resolution < minimum:
        raise BadInput(f"classifier {name!r} needs resolution >= {minimum}, got {resolution}")


def _need_depth(name: str, depth: int, step: int, offset: int) -> None:
    if not isinstance(depth, int) or depth < step + offset or (depth - offset) % step:
        raise BadInput(f"classifier {name!r} depth must be {step}n+{offset} with n >= 1, got {depth!r}")


def _need_positive(name: str, option: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise BadInput(f"classifier {name!r} option {option} must be an integer >= 1, got {value!r}")


def _cnn(in_channels: int, num_classes: int, resolution: int) -> nn.Module:
    _need_resolution("cnn", resolution, 4)
    return SmallCNN(in_channels, num_classes, resolution)


def _resnet(in_channels: int, num_classes: int, resolution: int, depth: int = 110, base_width: int = 16) -> nn.Module:
    _need_resolution("resnet", resolution, MIN_RESOLUTION)
    _need_depth("resnet", depth, 6, 2)
    _need_positive("resnet", "base_width", base_width)
    return CifarResNet(in_channels, num_classes, depth=depth, base_width=base_width)


def _wrn(
    in_channels: int, num_classes: int, resolution: int, depth: int = 40, width: int = 4, dropout: float = 0.3
) -> nn.Module:
    _need_resolution("wrn", resolution, MIN_RESOLUTION)
    _need_depth("wrn", depth, 6, 4)
    _need_positive("wrn", "width", width)
    if not 0.0 <= dropout < 1.0:
        raise BadInput(f"classifier 'wrn' option dropout must be in [0, 1), got {dropout!r}")
    return WideResNet(in_channels, num_classes, depth=depth, width=width, dropout=dropout)


def _resnext(
    in_channels: int,
    num_classes: int,
    resolution: int,
    depth: int = 29,
    cardinality: int = 8,
    bottleneck_width: int = 4,
) -> nn.Module:
    _need_resolution("resnext", resolution, MIN_RESOLUTION)
    _need_depth("resnext", depth, 9, 2)
    _need_positive("resnext", "cardinality", cardinality)
    _need_positive("resnext", "bottleneck_width", bottleneck_width)
    return CifarResNeXt(
        in_channels, num_classes, depth=depth, cardinality=cardinality, bottleneck_width=bottleneck_width
    )


# (in_channels, num_classes, resolution, **options) -> model; options are keyword arguments with defaults.
Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register_classifier(name: str, factory: Factory) -> None:
    """Add an architecture; names are unique so a typo cannot silently replace one."""
    if name in _REGISTRY:
        raise ValueError(f"classifier {name!r} is already registered")
    _REGISTRY[name] = factory


register_classifier("cnn", _cnn)
register_classifier("resnet", _resnet)
register_classifier("wrn", _wrn)
register_classifier("resnext", _resnext)


def classifier_names() -> list[str]:
    return sorted(_REGISTRY)


def classifier_options(name: str) -> dict[str, object]:
    """The keyword options `name` accepts, with their defaults (the published configuration)."""
    if name not in _REGISTRY:
        raise BadInput(f"unknown classifier {name!r}; allowed: {', '.join(classifier_names())}")
    params = list(inspect.signature(_REGISTRY[name]).parameters.values())[3:]  # skip the three positional ones
    return {p.name: p.default for p in params}


# DPImageBench's depths/widths for colour 32-px data (CIFAR); grey or <= 28 px sets use the defaults
# (ResNet-110, WRN-40-4, ResNeXt-29 8x4d). ResNet-164 here is the basic-block 6n+2 network (n = 27).
# "ResNeXt-28" cannot be built on the 9n+2 CIFAR template, so CIFAR gets ResNeXt-29 8x64d (Xie et al.'s
# CIFAR model, and DPImageBench's resnext.py widths).
CIFAR_OPTIONS = {"resnet": {"depth": 164}, "wrn": {"depth": 28, "width": 10},
                 "resnext": {"depth": 29, "bottleneck_width": 64}}


def published_options(name: str, in_channels: int, resolution: int) -> dict:
    """Architecture options for `name` at this input size, as DPImageBench configures it."""
    if in_channels == 3 and resolution >= 32:
        return dict(CIFAR_OPTIONS.get(name, {}))
    return {}


def build_classifier(name: str, in_channels: int, num_classes: int, resolution: int, **options) -> nn.Module:
    """A freshly initialised classifier for `in_channels` x `resolution`^2 images.

    `options` (e.g. depth=10, width=1 for "wrn") override the architecture's
    defaults; see `classifier_options(name)`.
    """
    allowed = classifier_options(name)  # also rejects unknown names
    if in_channels < 1:
        raise BadInput(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise BadInput(f"num_classes must be >= 2, got {num_classes}")
    for key in options:
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            raise BadInput(f"unknown option {key!r} for classifier {name!r}; allowed: {names}")
    return _REGISTRY[name](in_channels, num_classes, resolution, **options)

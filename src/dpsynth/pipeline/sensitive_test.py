"""The sensitive test set that test accuracy is measured on.

Named sets keep their official test split. `npz:` and `imagefolder:` data serve one source as
both splits (and single-split sets refuse 'test'), so a "test accuracy" on them would be measured
on the very images the generator was trained on: for those, accuracy needs `--sensitive-test SPEC`,
a labelled set disjoint from the training set. The test set is sensitive data too; the figures
computed on it are reporting, not release (see reporting.NOT_ACCOUNTED).
"""

from __future__ import annotations

from pathlib import Path

from ..data import ImageSet, load_dataset
from ..data.common import has_disjoint_test
from ..errors import BadInput, DatasetNotFound



def no_test_set(sensitive: str) -> str:
    """The one-line refusal for a run whose sensitive set has no disjoint test split."""
    return (f"`sensitive` {sensitive} has no test set disjoint from its training images (its 'test' split would "
            f"be the training data), so test accuracy cannot be measured; pass `sensitive_test` npz:PATH, "
            f"imagefolder:PATH or a dataset name with a test split (or `fidelity_only` for FID/precision/recall "
            f"against the training set)")


def _same_source(a: str, b: str) -> bool:
    head_a, colon_a, rest_a = a.partition(":")
    head_b, colon_b, rest_b = b.partition(":")
    if not (colon_a and colon_b):
        return a.lower() == b.lower()
    return head_a.lower() == head_b.lower() and Path(rest_a).expanduser().resolve() == \
        Path(rest_b).expanduser().resolve()


def _shape(images: ImageSet) -> str:
    _, c, h, w = images.images.shape
    return f"{c}x{h}x{w}"


def load_sensitive_test(spec: str, settings, train: ImageSet) -> ImageSet:
    """`spec`'s test split read as the run reads its data (resolution, channels), checked to match
    the training set `train`: same image shape, same classes, labelled, and not the training source."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInput(f"`sensitive_test` {spec!r} is empty; pass npz:PATH, imagefolder:PATH or a dataset name")
    if not has_disjoint_test(spec) and _same_source(spec, settings.sensitive):
        raise BadInput(f"sensitive_test={spec} is the training set itself (`sensitive` {settings.sensitive}); pass a "
                       f"file or folder of images the generator was not trained on")
    try:
        test = load_dataset(spec, "test", root=settings.data_root, resolution=settings.resolution,
                            channels=settings.channels, seed=settings.seed)
    except (BadInput, DatasetNotFound) as exc:
        raise type(exc)(f"sensitive_test={spec}: {exc}") from None
    if test.labels is None:
        raise BadInput(f"sensitive_test={spec} has no labels; test accuracy needs labels 0..{train.num_classes - 1}")
    if test.images.shape[1:] != train.images.shape[1:]:
        raise BadInput(f"sensitive_test={spec} has {_shape(test)} (CxHxW) images but the run's training images are "
                       f"{_shape(train)}; pass a test set of that shape")
    if test.num_classes != train.num_classes:
        raise BadInput(f"sensitive_test={spec} has {test.num_classes} classes but the training set has "
                       f"{train.num_classes}; pass a test set labelled 0..{train.num_classes - 1}")
    if test.class_names and train.class_names and tuple(test.class_names) != tuple(train.class_names):
        # Same count, other names: label k would mean another class than in training.
        raise BadInput(f"sensitive_test={spec} has classes {', '.join(test.class_names)} but the training set has "
                       f"{', '.join(train.class_names)}; pass a test set with the training set's classes")
    return test


def describe(spec: str | None, sensitive: str, test: ImageSet | None) -> str:
    """What test accuracy was measured on, for the results."""
    if test is None:
        return f"none: {sensitive} has no test set disjoint from its training images (accuracy not measured)"
    if spec:
        return f"{spec} ({len(test)} images, the test set given for this run)"
    return f"{sensitive} official test split ({len(test)} images)"

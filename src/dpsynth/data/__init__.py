"""Dataset registry: every dataset as uint8 NCHW tensors with int64 labels.

`load_dataset(name, split)` looks `name` up in a plain dict filled by the
loader modules below (importing them registers them). Nothing is downloaded
at load time; missing files raise DatasetNotFound naming where they must go.
"""

from . import celeba, npz, small_sets, torchvision_sets  # noqa: F401  (import = register)
from .fashion import provision_fashionmnist
from .imageset import ImageSet, content_digest, resize_images
from .registry import LoadRequest, data_root, dataset_names, load_dataset, register_dataset

__all__ = [
    "ImageSet",
    "LoadRequest",
    "data_root",
    "dataset_names",
    "content_digest",
    "load_dataset",
    "provision_fashionmnist",
    "register_dataset",
    "resize_images",
]

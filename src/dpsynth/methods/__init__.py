"""Generative methods: the base class (`base`), the registry (`registry`) and one module (or
family folder) per method. Importing the package registers every method in it."""

from ..key_values import parse_arch
from .base import DATA_KEYS, Method, PrivatePlan
from .registry import METHODS, discover, get_method, register_method

discover(__path__, __name__ + ".")

__all__ = ["DATA_KEYS", "METHODS", "Method", "PrivatePlan", "discover", "get_method", "parse_arch",
           "register_method"]

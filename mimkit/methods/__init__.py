"""Pretraining methods. Every public module here registers its presets when imported; they are all imported below,
so a new method is one new file (plus its test): see docs/design.md, "Adding a method"."""

import importlib
import pkgutil

from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import create_method, list_methods, method_options, register_preset

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MIMMethod", "create_method", "list_methods", "method_options", "register_preset"]

from mimkit.methods import coma, lomar, mae, mixmae, simmim, ummae  # noqa: F401  (register the presets)
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import create_method, list_methods, method_options, register_preset

__all__ = ["MIMMethod", "create_method", "list_methods", "method_options", "register_preset"]

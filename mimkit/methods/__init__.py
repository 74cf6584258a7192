from mimkit.methods import mae  # noqa: F401  (registers the MAE models)
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import create_method, list_methods, method_options, register_preset

__all__ = ["MIMMethod", "create_method", "list_methods", "method_options", "register_preset"]

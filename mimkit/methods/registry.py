"""Registry of named pretraining models: a method class plus preset defaults, e.g. ``mae_vit_base_patch16``."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field

from mimkit.errors import ConfigError
from mimkit.methods.base import MIMMethod


@dataclass(frozen=True)
class Preset:
    """A named model: the method class, its default options and a one-line description."""

    name: str
    cls: type
    defaults: dict = field(default_factory=dict)
    doc: str = ""


_REGISTRY: dict[str, Preset] = {}


def register_preset(name: str, cls: type, doc: str, **defaults) -> None:
    """Register ``name`` as ``cls`` with ``defaults``; ``doc`` is the line `mimkit models` prints."""
    _REGISTRY[name] = Preset(name, cls, defaults, doc)


def list_methods() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_REGISTRY)


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a ConfigError that suggests close names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{name}'.{hint} `mimkit models` lists them all.")
    return _REGISTRY[name]


def method_options(name: str) -> dict[str, object]:
    """Every option of a registered model with its default (class defaults overlaid with the preset's)."""
    preset = get_preset(name)
    params = inspect.signature(preset.cls).parameters  # the class's __init__, without self
    opts = {k: p.default for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
    return {**opts, **preset.defaults}


def create_method(name: str, **kwargs) -> MIMMethod:
    """Build the registered model ``name`` with its defaults overridden by ``kwargs`` (unknown keys are a
    ConfigError that lists the accepted ones)."""
    preset = get_preset(name)
    accepted = method_options(name)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ConfigError(
            f"model '{name}' has no option {', '.join(unknown)}; its options are: "
            f"{', '.join(accepted)} (`mimkit models {name}` shows the defaults)"
        )
    try:
        return preset.cls(**{**preset.defaults, **kwargs})
    except ConfigError:
        raise
    except ValueError as err:  # a model's own check of its options (sizes, modes): the user's to fix
        raise ConfigError(f"model '{name}': {err}") from err

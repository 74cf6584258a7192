"""One way to build an encoder from the timm registry."""

from __future__ import annotations


def create_encoder(name: str, **kwargs):
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` with one clear error for an unknown
    name; any other failure (a size the backbone rejects, a bad option) keeps its own message and cause."""
    import difflib

    import timm

    from mimkit.errors import ConfigError

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown encoder '{name}' (not a timm model).{hint}")
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)

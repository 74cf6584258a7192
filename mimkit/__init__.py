"""mimkit: efficient masked-image-modeling pretraining for plain and hierarchical vision transformers."""

from mimkit._compat import ensure_torchvision, patch_timm_posterize

ensure_torchvision()
patch_timm_posterize()

__version__ = "0.1.0"

# registers the backbones with timm and the pretraining methods (methods import models first)
from mimkit import methods, models  # noqa: E402,F401

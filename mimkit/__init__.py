"""mimkit: efficient masked-image-modeling pretraining for plain and hierarchical vision transformers."""
from mimkit._compat import ensure_torchvision, patch_timm_posterize

ensure_torchvision()
patch_timm_posterize()

__version__ = "0.1.0"

from mimkit import models  # noqa: E402,F401  (registers backbones with timm)
from mimkit import methods  # noqa: E402,F401  (registers pretraining methods)

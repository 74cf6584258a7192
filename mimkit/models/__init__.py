import importlib
import pkgutil

from mimkit.models._create import create_encoder
from mimkit.models.decoder import TransformerDecoder
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import create_vit_encoder, mae_init_

# every public module registers its backbones with timm when imported: a new backbone is one new file (plus its test)
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TransformerDecoder", "sincos_2d", "create_encoder", "create_vit_encoder", "mae_init_"]

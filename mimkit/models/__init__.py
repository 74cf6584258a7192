from mimkit.models.decoder import TransformerDecoder
from mimkit.models.pos_embed import sincos_2d
from mimkit.models import dyvit, mixswin, pvt, rpb_vit, swin  # noqa: F401  (register with timm)
from mimkit.models.vit import create_vit_encoder, mae_init_

__all__ = ["TransformerDecoder", "sincos_2d", "create_vit_encoder", "mae_init_"]

import pytest
import torch
from torchvision.models.detection import RetinaNet

from mimkit.detection import anchor_generator, fpn_backbone
from mimkit.export import export_encoder
from mimkit.methods import create_method


@pytest.mark.parametrize("name", ["umae_swin_pico_128", "mixmae_swin_pico_128", "coma_dyvit_pico_128"])
def test_retinanet_trains_on_an_exported_mimkit_encoder(tmp_path, name):
    torch.manual_seed(0)
    method = create_method(name)
    path = tmp_path / "swin.safetensors"
    meta = export_encoder(method, path, head_classes=0)
    backbone = fpn_backbone(meta["timm_model"], weights=path, out_channels=32)
    w = "stages.1.blocks.0.attn.qkv.weight"
    assert torch.equal(
        backbone.body.state_dict()["model." + w], method.encoder.state_dict()[w]
    )  # weights really loaded
    det = RetinaNet(backbone, num_classes=3, anchor_generator=anchor_generator(backbone), min_size=128, max_size=128)
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0], [5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([2, 0])},
    ]
    det.train()
    losses = det(images, targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and backbone.body.model.stages[1].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


def test_vit_simple_pyramid_backbone_trains_in_retinanet(tmp_path):
    from mimkit.detection import vit_pyramid_backbone

    torch.manual_seed(0)
    method = create_method("mae_vit_tiny_patch16", img_size=64, encoder_args={"depth": 2})
    path = tmp_path / "vit.safetensors"
    meta = export_encoder(method, path, head_classes=0)
    backbone = vit_pyramid_backbone(meta["timm_model"], weights=path, out_channels=32, img_size=128, depth=2)
    feats = backbone.body(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4] and backbone.body.feature_info.reduction() == [4, 8, 16, 32]
    det = RetinaNet(backbone, num_classes=2, anchor_generator=anchor_generator(backbone), min_size=128, max_size=128)
    losses = det(
        [torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[8.0, 8.0, 70.0, 90.0]]), "labels": torch.tensor([1])}]
    )
    sum(losses.values()).backward()
    assert backbone.body.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

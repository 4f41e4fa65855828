import pytest
import torch

from purer.zoo import ModelConfig, Teacher, build_model


@pytest.mark.parametrize("arch", ["conv4", "resnet10", "resnet18", "tv:mobilenet_v3_small"])
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32)])
def test_every_architecture_any_channels_and_size(arch, channels, size):
    m = build_model(arch, num_classes=5, in_channels=channels, image_size=size,
                    arch_args={"width": 8} if arch != "tv:mobilenet_v3_small" else None)
    x = torch.rand(2, channels, size, size)
    assert m(x).shape == (2, 5)
    assert m.features(x).shape == (2, m.feature_dim)


def test_conv4_feature_size_follows_image_size():
    assert build_model("conv4", 5, 1, 28).feature_dim == 32  # 28 -> 14 -> 7 -> 3 -> 1
    assert build_model("conv4", 5, 1, 32).feature_dim == 128  # 2 x 2 x 32


def test_unknown_arch_and_bad_args_are_clear():
    with pytest.raises(ValueError, match="unknown architecture 'conv5'"):
        build_model("conv5", 5)
    with pytest.raises(ValueError, match="bad arch_args"):
        build_model("conv4", 5, arch_args={"widht": 3})
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("tv:not_a_model", 5)


def test_teacher_adapts_inputs_and_stays_frozen():
    cfg = ModelConfig("conv4", 3, ["a", "b", "c"], in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                      arch_args={"width": 8})
    t = Teacher(cfg.build(), cfg)
    assert not t.training
    t.train()
    assert not t.model.training  # BN running stats are the inversion target: never trained
    x = torch.rand(4, 1, 8, 8, requires_grad=True)  # grey and smaller: repeated and resized
    t(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


def test_model_config_checks():
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig("conv4", 2, ["a"])
    with pytest.raises(ValueError, match="distinct"):
        ModelConfig("conv4", 2, ["a", "a"])
    with pytest.raises(ValueError, match="unknown config.json keys"):
        ModelConfig.from_dict({"arch": "conv4", "num_classes": 1, "class_ids": ["a"], "colour": 1})

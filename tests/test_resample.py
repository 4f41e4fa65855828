"""purer.resample: the deterministic bilinear resamplings equal grid_sample and interpolate, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from purer.inversion.augment import RandomAffineAugment
from purer.resample import affine_resample, resize


@pytest.mark.parametrize("size", [5, 16, 24, 40, 84])
def test_resize_is_bilinear_interpolation(size):
    x = torch.rand(3, 2, 24, 20, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, size, size, dtype=torch.float64)
    ours = resize(x, size)
    theirs = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.allclose(torch.autograd.grad((ours * g).sum(), x)[0],
                          torch.autograd.grad((theirs * g).sum(), x)[0], atol=1e-12)


@pytest.mark.parametrize("flip", [False, True])
def test_the_augmentation_warp_is_grid_sample_with_border_padding(flip):
    aug = RandomAffineAugment(jitter=3, crop_scale=(0.5, 1.0), flip=flip, image_size=16)
    theta = aug.sample(6, torch.Generator().manual_seed(0)).double()
    theta[0, :, 2] = torch.tensor([1.7, -1.4], dtype=torch.float64)  # far outside: the border repeats
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    theirs = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                           padding_mode="border", align_corners=False)
    ours = aug(x, theta)
    assert torch.allclose(ours, theirs, atol=1e-12)
    g = torch.randn_like(ours)
    assert torch.allclose(torch.autograd.grad((ours * g).sum(), x)[0],
                          torch.autograd.grad((theirs * g).sum(), x)[0], atol=1e-12)


def test_affine_resample_takes_any_axis_aligned_map():
    x = torch.rand(2, 1, 9, 9, dtype=torch.float64)
    identity = affine_resample(x, torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.allclose(identity, x, atol=1e-12)
    mirrored = affine_resample(x, torch.tensor([[-1.0, 1.0]] * 2, dtype=torch.float64),
                               torch.zeros(2, 2, dtype=torch.float64))
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-12)

"""Tiny synthetic data and teachers shared by the meta-learning, evaluation and baseline tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from purer.data import ImageSet
from purer.zoo import ModelConfig, Teacher, build_model

SIZE = 8
ARCH_ARGS = {"width": 8, "depth": 2}  # 8x8 -> 2x2x8 = 32 features


def template_images(num_classes: int = 12, per_class: int = 10, noise: float = 0.15, seed: int = 0,
                    name: str = "synthetic") -> ImageSet:
    """Each class is a random 4x4 binary template upsampled to 8x8; instances add Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, 1, 4, 4, generator=g).round(), size=(SIZE, SIZE))
    x = templates.repeat_interleave(per_class, 0)
    x = (0.8 * x + 0.1 + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return ImageSet(x, labels, [f"{name}{i}" for i in range(num_classes)], name=name)


def tiny_teacher(data: ImageSet, classes: list[int], seed: int = 0, steps: int = 40) -> Teacher:
    """A depth-2 width-8 Conv4 trained for a few Adam steps on ``classes`` of ``data``."""
    torch.manual_seed(seed)
    sub = data.subset(classes)
    model = build_model("conv4", len(classes), in_channels=1, image_size=SIZE, arch_args=ARCH_ARGS)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = (sub.float_images() - 0.5) / 0.25, sub.labels  # the normalisation the config declares
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    config = ModelConfig(arch="conv4", num_classes=len(classes), class_ids=[data.class_names[c] for c in classes],
                         in_channels=1, image_size=SIZE, mean=[0.5], std=[0.25], arch_args=dict(ARCH_ARGS))
    return Teacher(model, config, model_id=f"t{seed}")


def assert_together_equals_one_by_one(learner, batch) -> None:
    """vmap over ``batch``'s tasks (each its own BatchNorm batch) gives the per-task logits and the same
    meta-gradient as adapting the tasks one by one (a float64 ``learner`` and ``batch`` of 3 5-way tasks)."""
    import torch

    params = [p for p in learner.parameters()]
    learner.task_batching = "vmap"
    assert learner.tasks_together(batch.support_x.device)  # the learner offers tasks together
    together = learner.batch_query_logits(batch)
    learner.task_batching = "loop"
    one_by_one = learner.batch_query_logits(batch)
    assert together.shape == (len(batch), batch.query_y.numel(), batch.way)
    assert torch.allclose(together, one_by_one, rtol=1e-10, atol=1e-10)
    loss = lambda logits: learner.query_loss(logits.flatten(0, 1), batch.query_y.repeat(len(batch)))
    g1 = torch.autograd.grad(loss(together), params)
    g2 = torch.autograd.grad(loss(one_by_one), params)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(g1, g2))
    learner.task_batching = "vmap"
    with torch.no_grad():  # test time: no graph, the same logits
        assert torch.allclose(learner.batch_query_logits(batch), together, atol=1e-10)

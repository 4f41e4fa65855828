"""Episode inversion and its curriculum on a tiny synthetic zoo (16x16 images, a few seconds of training)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from purer.data import EpisodeSampler
from purer.inversion import (BNStatsHook, EpisodeInversion, GradientSwitch, InversionConfig, L2Prior, PseudoBank,
                             RandomAffineAugment, SwitchConfig, TotalVariation, bn_distance, build_augmentation,
                             l2_prior, save_bank_grid, save_episode_grid, total_variation)
from purer.inversion.grid import class_labels
from purer.pipeline.pictures import save_training_plot
from purer.meta.base import MetaLearner
from purer.zoo import ModelConfig, Teacher, prepare_input

SIZE = 16
WAYS = 5


def class_data(first_class: int, n_classes: int, n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable classes: class ``c`` is a fixed smooth template (seeded by ``c``) plus uniform noise."""
    templates = []
    for c in range(first_class, first_class + n_classes):
        t = F.avg_pool2d(torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1000 + c)), 3, 1, 1)
        templates.append((t - t.min()) / (t.max() - t.min()))
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([0.7 * t + 0.3 * torch.rand(n_per, 1, SIZE, SIZE, generator=g) for t in templates])
    return x, torch.arange(n_classes).repeat_interleave(n_per)


def train_teacher(first_class: int, model_id: str, image_size: int = SIZE, channels: int = 1,
                  mean: float = 0.5, std: float = 0.25, seed: int = 0, class_ids: list[str] | None = None) -> Teacher:
    torch.manual_seed(seed)
    config = ModelConfig("conv4", WAYS, class_ids or [f"class{first_class + k}" for k in range(WAYS)],
                         in_channels=channels, image_size=image_size, mean=[mean], std=[std],
                         arch_args={"width": 8, "depth": 2})
    model = config.build()
    teacher = Teacher(model, config, model_id)
    x, y = class_data(first_class, WAYS, 40, seed)
    inputs = teacher.prepare(x)  # the teacher is trained on exactly what it will be fed
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        i = torch.randint(len(x), (32,), generator=g)
        loss = F.cross_entropy(model(inputs[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        assert (model(inputs).argmax(-1) == y).float().mean() > 0.95, "fixture teacher failed to learn"
    return teacher



@pytest.fixture(scope="module")
def zoo() -> list[Teacher]:
    """Three Conv4 teachers (16 px, grey) on disjoint 5-class blocks."""
    return [train_teacher(WAYS * i, f"t{i}", seed=i) for i in range(3)]


class TinyProtoNet(MetaLearner):
    """A stand-in meta-learner: prototypes of a one-block conv encoder, negative squared distances."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Flatten())

    def adapt(self, support_x, support_y, way, *, create_graph=False):
        f = self.encoder(support_x)
        return torch.stack([f[support_y == k].mean(0) for k in range(way)])

    def predict(self, adapted, x):
        return -torch.cdist(self.encoder(x), adapted).square()


def no_aug(**kw) -> InversionConfig:
    return InversionConfig(augment=False, **kw)


# ---------------------------------------------------------------- BN hook

def test_bn_hook_matches_manual_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3))
    net.train()
    net(torch.rand(16, 1, 8, 8))  # gives the BN layers non-trivial running statistics
    net.eval()
    x = torch.rand(5, 1, 8, 8)
    with BNStatsHook(net) as bn:
        net(x)
    h1 = net[0](x)
    h2 = net[3](net[2](net[1](h1)))
    expected = 0
    for h, layer in ((h1, net[1]), (h2, net[4])):
        m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        expected += (m - layer.running_mean).norm() + (v - layer.running_var).norm()
    assert len(bn.terms) == 2
    assert torch.allclose(bn.loss(), expected, atol=1e-5)


def test_bn_hooks_removed_even_after_an_exception(zoo):
    model = zoo[0].model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with pytest.raises(RuntimeError, match="boom"):
        with BNStatsHook(model) as bn:
            assert bn.active and all(len(m._forward_pre_hooks) == 1 for m in bns)
            raise RuntimeError("boom")
    assert not bn.active
    assert all(len(m._forward_pre_hooks) == 0 for m in bns)


def test_bn_hook_rejects_layers_without_running_stats_and_bad_shapes():
    with pytest.raises(ValueError, match="running statistics"):
        BNStatsHook(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match=r"\[B, C, \.\.\.\]"):
        bn_distance(torch.rand(4, 2, 5, 5), torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------- priors

def test_total_variation_counts_rows_columns_and_both_diagonals():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    # rows: |1-0| twice -> sqrt(2); columns: 0; diagonal: 1-0; anti-diagonal: 0-1
    assert math.isclose(total_variation(x).item(), math.sqrt(2) + 2, rel_tol=1e-6)
    assert total_variation(torch.full((2, 3, 5, 5), 0.3)).item() == 0
    assert math.isclose(l2_prior(torch.full((2, 1, 2, 2), 0.5)).item(), math.sqrt(8 * 0.25), rel_tol=1e-6)


def test_priors_modules_equal_functions_and_have_correct_gradients():
    x = torch.rand(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert TotalVariation()(x) == total_variation(x) and L2Prior()(x) == l2_prior(x)
    assert torch.autograd.gradcheck(total_variation, (x,))
    assert torch.autograd.gradcheck(l2_prior, (x,))


@pytest.mark.parametrize("bad, message", [(torch.rand(3, 8, 8), r"\[B, C, H, W\]"),
                                          (torch.rand(1, 1, 1, 8), "at least 2x2"),
                                          (torch.ones(1, 1, 4, 4, dtype=torch.uint8), "floating-point")])
def test_total_variation_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        total_variation(bad)


# ---------------------------------------------------------------- bank

def test_bank_classes_disjoint_or_merged():
    a = train_teacher(0, "a", class_ids=["x", "y", "z", "u", "v"])
    b = train_teacher(0, "b", class_ids=["x", "y", "p", "q", "r"])
    separate = PseudoBank([a, b], images_per_class=3)
    assert separate.num_classes == 10 and separate.class_names[:2] == ["a/x", "a/y"]
    merged = PseudoBank([a, b], images_per_class=3, merge_shared_classes=True)
    assert merged.num_classes == 8
    assert merged.teacher_classes == [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]
    assert merged.class_teachers[0] == [0, 1] and merged.class_teachers[5] == [1]
    with pytest.raises(ValueError, match="distinct model_id"):
        PseudoBank([a, a], images_per_class=3)


def test_bank_rejects_bad_sizes_and_channels(zoo):
    with pytest.raises(ValueError, match="images_per_class"):
        PseudoBank(zoo, images_per_class=0)
    odd = ModelConfig("conv4", 2, ["a", "b"], in_channels=2, image_size=SIZE, arch_args={"width": 4, "depth": 1})
    with pytest.raises(ValueError, match="2 channels"):
        PseudoBank([Teacher(odd.build(), odd, "odd")], images_per_class=2, channels=3)


def test_pseudo_episode_shapes_labels_and_gradients_reach_only_its_classes(zoo):
    bank = PseudoBank(zoo, images_per_class=5)
    sampler = EpisodeSampler(bank.class_sizes(), way=7, shot=2, query=3, seed=1)
    spec = sampler.task(0)
    episode = bank.episode(spec)
    assert episode.support_x.shape == (14, 1, SIZE, SIZE) and episode.query_x.shape == (21, 1, SIZE, SIZE)
    assert episode.support_y.tolist() == [k for k in range(7) for _ in range(2)]
    assert episode.query_y.tolist() == [k for k in range(7) for _ in range(3)]
    assert episode.classes == tuple(bank.class_names[c] for c in spec.classes)
    assert len({bank.class_teachers[c][0] for c in spec.classes}) > 1  # one task mixes teachers' classes
    assert 0 <= episode.support_x.min() and episode.query_x.max() <= 1
    # the support image of label 1, shot 0 is bank image support[1, 0] of class classes[1]
    c, i = int(spec.classes[1]), int(spec.support[1, 0])
    assert torch.equal(episode.support_x[2], torch.sigmoid(bank.logits[c][i]))
    (episode.support_x.sum() + episode.query_x.sum()).backward()
    for k, p in enumerate(bank.logits):
        if k in spec.classes:
            used = set(spec.support[list(spec.classes).index(k)]) | set(spec.query[list(spec.classes).index(k)])
            touched_images = {j for j in range(5) if p.grad[j].abs().sum() > 0}
            assert touched_images == used
        else:
            assert p.grad is None


def untrained_teacher(model_id: str, channels: int = 1, mean: list[float] = (0.5,),
                      std: list[float] = (0.25,)) -> Teacher:
    config = ModelConfig("conv4", 2, ["a", "b"], in_channels=channels, image_size=SIZE, mean=list(mean),
                         std=list(std), arch_args={"width": 4, "depth": 1})
    return Teacher(config.build(), config, model_id)


def test_normalized_bank_is_mean_plus_std_times_z_with_the_pixel_banks_seed(zoo):
    pixel = PseudoBank(zoo, images_per_class=4, seed=3)
    normalized = PseudoBank(zoo, images_per_class=4, seed=3, space="normalized")
    assert torch.equal(normalized.logits[2], pixel.logits[2])  # the same standard normal start
    assert torch.allclose(normalized.snapshot([2])[0], 0.5 + 0.25 * pixel.logits[2])  # the zoo's mean 0.5, std 0.25
    assert torch.equal(pixel.snapshot([2])[0], torch.sigmoid(pixel.logits[2]))
    assert set(normalized.state_dict()) == set(pixel.state_dict())  # mean and std are not checkpointed


def test_normalized_bank_averages_the_teachers_normalisations_and_rejects_what_cannot_be_averaged():
    grey = untrained_teacher("grey", mean=[0.2], std=[0.4])
    colour = untrained_teacher("colour", channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.2, 0.2])
    bank = PseudoBank([grey, colour], images_per_class=2, space="normalized")
    assert torch.allclose(bank.mean.flatten(), torch.tensor([0.3, 0.35, 0.4]))
    assert torch.allclose(bank.std.flatten(), torch.tensor([0.3, 0.3, 0.3]))
    with pytest.raises(ValueError, match="3 mean values"):
        PseudoBank([grey, colour], images_per_class=2, channels=1, space="normalized")
    with pytest.raises(ValueError, match="space must be one of"):
        PseudoBank([grey], images_per_class=2, space="logit")
    with pytest.raises(ValueError, match="space must be one of"):
        InversionConfig(space="logit")
    with pytest.raises(ValueError, match="build the bank with"):
        EpisodeInversion([grey], PseudoBank([grey], images_per_class=2), InversionConfig(space="normalized"))


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_both_bank_spaces_invert_and_only_the_pixel_space_stays_in_the_unit_range(zoo, space, tmp_path):
    bank = PseudoBank(zoo, images_per_class=6, space=space)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=3, space=space))
    ce = [inversion.step()["ce"] for _ in range(60)]
    assert np.mean(ce[-5:]) < 0.25 * ce[0], f"{space}: teacher CE {ce[0]:.2f} -> {np.mean(ce[-5:]):.2f}"
    images = bank.snapshot()
    if space == "pixel":
        assert 0 <= images.min() and images.max() <= 1
    else:
        assert images.min() < 0 or images.max() > 1  # unbounded: nothing squashes or clamps them
    # episodes carry the images as they are; only a picture clamps them
    spec = EpisodeSampler(bank.class_sizes(), way=3, shot=1, query=2).task(0)
    episode = bank.episode(spec)
    assert torch.equal(episode.support_x[0], images[int(spec.classes[0]), int(spec.support[0, 0])])
    with Image.open(save_episode_grid(episode, tmp_path / "episode.png", scale=1, labelled=False)) as im:
        assert im.size == ((1 + 1 + 2) * (SIZE + 1) + 1, 3 * (SIZE + 1) + 1)


# ---------------------------------------------------------------- episode inversion

def test_inversion_makes_teachers_recognise_the_bank(zoo):
    torch.manual_seed(0)
    bank = PseudoBank(zoo, images_per_class=6)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=2))
    with torch.no_grad():
        before = [(t(bank.teacher_batch(i)[0]).argmax(-1) == bank.teacher_batch(i)[1]).float().mean().item()
                  for i, t in enumerate(zoo)]
    for _ in range(150):
        inversion.step()
    with torch.no_grad():
        after = [(t(bank.teacher_batch(i)[0]).argmax(-1) == bank.teacher_batch(i)[1]).float().mean().item()
                 for i, t in enumerate(zoo)]
    assert min(after) >= 0.9, f"teacher accuracy on the bank: before {before}, after {after}"


def test_r_bn_falls_over_inversion_steps(zoo):
    def run(a_bn: float) -> list[float]:
        torch.manual_seed(0)
        bank = PseudoBank(zoo[:1], images_per_class=6)
        inversion = EpisodeInversion(zoo[:1], bank, no_aug(a_bn=a_bn))
        return [inversion.step()["r_bn"] for _ in range(80)]

    with_bn, without_bn = run(0.1), run(0.0)
    assert np.mean(with_bn[-10:]) < 0.5 * with_bn[0]
    assert np.mean(with_bn[-10:]) < 0.5 * np.mean(without_bn[-10:])


def test_heterogeneous_teachers_share_one_bank(zoo):
    # a colour teacher at 12 px with another normalisation, next to a grey 16 px one
    odd = train_teacher(WAYS, "colour12", image_size=12, channels=3, mean=0.2, std=0.5, seed=5)
    teachers = [zoo[0], odd]
    torch.manual_seed(0)
    bank = PseudoBank(teachers, images_per_class=6)
    assert bank.image_shape == (3, SIZE, SIZE)
    inversion = EpisodeInversion(teachers, bank, InversionConfig())
    for _ in range(120):
        stats = inversion.step()
    assert math.isfinite(stats["loss"])
    with torch.no_grad():
        for i, t in enumerate(teachers):
            x, y = bank.teacher_batch(i)
            assert (t(x).argmax(-1) == y).float().mean() >= 0.9, f"teacher {t.model_id} does not recognise the bank"


def test_untouched_classes_do_not_move(zoo):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, no_aug())
    start = bank.snapshot()
    inversion.step(teachers=[0])
    after_first = bank.snapshot()
    mine, others = bank.teacher_classes[0], bank.teacher_classes[1] + bank.teacher_classes[2]
    assert all(not torch.equal(after_first[c], start[c]) for c in mine)
    assert all(torch.equal(after_first[c], start[c]) for c in others)
    assert set(inversion.optimizer.state) == {bank.logits[c] for c in mine}
    # teacher 0's classes carry Adam momentum, yet a step on teacher 1 must leave them alone
    inversion.step(teachers=[1])
    after_second = bank.snapshot()
    assert all(torch.equal(after_second[c], after_first[c]) for c in mine + bank.teacher_classes[2])


def test_stale_grads_from_outside_the_step_are_ignored(zoo):
    """A backward through an undetached pseudo episode fills bank .grad; the next step must not apply it."""
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, no_aug())
    other = bank.teacher_classes[2]
    sum(bank.class_images(c).sum() for c in other).backward()  # e.g. a meta-update on bank episodes
    start = bank.snapshot()
    inversion.step(teachers=[0])
    after = bank.snapshot()
    assert all(torch.equal(after[c], start[c]) for c in other)
    assert all(p.grad is None for p in bank.parameters())


def test_step_samples_teachers_per_step_and_weights_them_equally(zoo):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, no_aug(teachers_per_step=2, seed=3))
    picks = [inversion.sample_teachers() for _ in range(20)]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks) and {i for p in picks for i in p} == {0, 1, 2}
    losses = [inversion.teacher_loss(i)[0].item() for i in (0, 2)]
    bank.pop_touched()
    both = inversion.step(teachers=[0, 2])
    assert math.isclose(both["loss"], sum(losses) / 2, rel_tol=1e-5)


def test_extra_loss_is_added_and_checked(zoo):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, no_aug())
    plain = inversion.teacher_loss(1)[0].item()
    stats = inversion.step(extra_loss=lambda b: b.class_images(0).mean() * 0 + 2.0, teachers=[1])
    assert math.isclose(stats["loss"], plain + 2.0, rel_tol=1e-5) and stats["extra"] == 2.0
    with pytest.raises(ValueError, match="0-dim"):
        inversion.step(extra_loss=lambda b: b.class_images(0), teachers=[1])


def test_a_step_split_over_processes_is_bit_for_bit_the_whole_step(zoo):
    """Two simulated processes: one runs teacher 0 and the extra loss, the other teacher 2.

    The extra loss reads classes of both teachers, so those classes sum gradient terms
    computed in different processes: they must add up in the one-process order, bit for bit
    (an all-reduce of per-process sums rounds differently, and a run then depends on its split).
    """
    def fresh():
        bank = PseudoBank(zoo, images_per_class=3)
        return bank, EpisodeInversion(zoo, bank, InversionConfig(seed=7))

    def extra(bank):
        a, b = bank.teacher_classes[0][0], bank.teacher_classes[2][1]
        return -10 * (bank.class_images(a) * bank.class_images(b).flip(-1)).mean()

    whole_bank, whole = fresh()
    whole_stats = whole.step(extra_loss=extra, teachers=[0, 2])
    other: dict[int, dict[int, torch.Tensor]] = {}
    _, second = fresh()
    second_stats = second.step(teachers=[2], total=2, sync=lambda terms: other.update(terms) or terms)  # records
    bank, first = fresh()
    stats = first.step(extra_loss=extra, teachers=[0], total=2, sync=lambda terms: {**terms, **other})
    assert set(other) == {2} and set(other[2]) == set(bank.teacher_classes[2])
    assert torch.equal(bank.snapshot(), whole_bank.snapshot())
    assert math.isclose(stats["loss"] + second_stats["loss"], whole_stats["loss"], rel_tol=1e-5)  # sum / total
    # a process with no teacher in its share still applies the gathered gradients and logs every key
    idle_bank, idle = fresh()
    idle_stats = idle.step(teachers=[], total=2, sync=lambda terms: {**terms, **other})
    assert math.isnan(idle_stats["ce"]) and set(idle_stats) >= {"ce", "r_bn", "r_tv", "r_l2", "acc", "loss"}
    assert all(not torch.equal(idle_bank.snapshot([c]), fresh()[0].snapshot([c])) for c in bank.teacher_classes[2])


def mixed_zoo(dtype=torch.float64) -> list[Teacher]:
    """Random teachers of two architectures (Conv4, ResNet-10), two input contracts and two class counts, with
    non-trivial BN running statistics; teachers of one contract differ in their normalisation."""
    zoo = []
    for i, (arch, args, size, classes, mean) in enumerate([
            ("conv4", {"width": 4, "depth": 2}, SIZE, 3, 0.5), ("resnet10", {"width": 4}, 12, 3, 0.4),
            ("conv4", {"width": 4, "depth": 2}, SIZE, 3, 0.3), ("resnet10", {"width": 4}, 12, 3, 0.6),
            ("conv4", {"width": 4, "depth": 2}, SIZE, 2, 0.5)]):
        torch.manual_seed(i)
        config = ModelConfig(arch, classes, [f"t{i}c{k}" for k in range(classes)], in_channels=1, image_size=size,
                             mean=[mean], std=[0.25], arch_args=args)
        model = config.build().train()
        with torch.no_grad():
            model(torch.rand(8, 1, size, size))
        zoo.append(Teacher(model.to(dtype), config, f"m{i}"))
    return zoo


@pytest.mark.parametrize("augment", [False, True])
def test_batched_teachers_equal_the_per_teacher_step(augment):
    """vmap over same-contract teachers (each its own BN statistics) gives the loop's losses and bank gradients."""
    results = []
    for batching in ("loop", "vmap"):
        zoo = mixed_zoo()
        bank = PseudoBank(zoo, images_per_class=3, seed=2).double()
        inversion = EpisodeInversion(zoo, bank, InversionConfig(teacher_batching=batching, augment=augment, seed=5,
                                                                first_bn_weight=3.0, bn_layers="mean", a_div=0.5))
        assert inversion.batched == (batching == "vmap")
        losses, parts = inversion.teacher_losses([0, 1, 2, 3, 4])
        grads = torch.autograd.grad(losses.sum(), list(bank.logits))
        results.append((losses, parts, grads))
    (l1, p1, g1), (l2, p2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-10, atol=1e-12)
    assert all(torch.allclose(p1[k], p2[k], rtol=1e-10, atol=1e-12) for k in p1)
    assert (p1["r_bn"] > 0).all()  # every teacher's own BN statistics, none shared
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
    assert all(g.abs().sum() > 0 for g in g1)


def test_a_step_under_bf16_autocast_still_lowers_the_inversion_loss(zoo):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, no_aug(), autocast=torch.bfloat16)
    first = inversion.teacher_losses([0, 1, 2])[0].sum().item()
    for _ in range(5):
        stats = inversion.step(teachers=[0, 1, 2])
    assert stats["loss"].dtype == torch.float32
    assert inversion.teacher_losses([0, 1, 2])[0].sum().item() < first
    assert all(p.dtype == torch.float32 for p in bank.parameters())


def test_a_teacher_without_batchnorm_is_named_in_one_warning(zoo, capsys):
    """R_bn needs BatchNorm statistics: a teacher without them is said once, by name, as one line in the recipe."""
    import importlib.util

    from purer import PurerWarning

    config = ModelConfig("conv4", WAYS, [f"plain{k}" for k in range(WAYS)], in_channels=1, image_size=SIZE,
                         arch_args={"width": 8, "depth": 2})
    model = config.build()
    for name, child in list(model.encoder.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.BatchNorm2d):
                setattr(child, attr, nn.Identity())
    teachers = [*zoo[:2], Teacher(model.eval(), config, "plain")]
    with pytest.warns(PurerWarning) as record:
        EpisodeInversion(teachers, PseudoBank(teachers, images_per_class=2), no_aug())
    assert len(record) == 1 and str(record[0].message).startswith(
        "1 of 3 teachers have no BatchNorm layer (plain), so R_bn cannot shape their pseudo images")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a_bn = 0 asks for no R_bn: nothing to say
        EpisodeInversion(teachers, PseudoBank(teachers, images_per_class=2), no_aug(a_bn=0.0))
    spec = importlib.util.spec_from_file_location("recipe", Path(__file__).resolve().parents[1] / "recipes" / "purer.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe._show_warning(record[0].message, PurerWarning, "synthesizer.py", 1)
    assert capsys.readouterr().err == f"purer: warning: {record[0].message}\n"


def test_augmented_steps_do_not_depend_on_the_global_rng(zoo):
    banks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        bank = PseudoBank(zoo, images_per_class=3)
        inversion = EpisodeInversion(zoo, bank, InversionConfig(seed=4))
        for _ in range(3):
            inversion.step()
        banks.append(bank.snapshot())
    assert torch.equal(*banks)


def resumes_from_its_state(fresh, path) -> None:
    """A synthesizer stopped after two of four steps and restored from a saved state (bank and synthesizer)
    ends where four straight steps end; ``fresh()`` builds ``(bank, synthesizer)``."""
    bank, inversion = fresh()
    for _ in range(4):
        inversion.step()
    straight = bank.snapshot()
    bank, inversion = fresh()
    for _ in range(2):
        inversion.step()
    torch.save({"bank": bank.state_dict(), "inversion": inversion.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    bank, inversion = fresh()
    bank.load_state_dict(state["bank"])
    inversion.load_state_dict(state["inversion"])
    for _ in range(2):
        inversion.step()
    assert inversion.steps == 4 and torch.equal(bank.snapshot(), straight)


def test_inversion_resumes_from_its_state(zoo, tmp_path):
    def fresh():
        bank = PseudoBank(zoo, images_per_class=3)
        return bank, EpisodeInversion(zoo, bank, no_aug(teachers_per_step=1))

    resumes_from_its_state(fresh, tmp_path / "ckpt.pt")


def test_inversion_config_and_zoo_mismatch_raise(zoo):
    with pytest.raises(ValueError, match="teachers_per_step"):
        InversionConfig(teachers_per_step=0)
    with pytest.raises(ValueError, match="crop_scale"):
        InversionConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="same teachers"):
        EpisodeInversion(zoo[:2], PseudoBank(zoo, images_per_class=2))


def test_augmentation_is_differentiable_and_switchable():
    x = torch.rand(6, 1, SIZE, SIZE, requires_grad=True)
    aug = build_augmentation(InversionConfig(flip=True), SIZE)
    theta = aug.sample(6, torch.Generator().manual_seed(0))
    y = aug(x, theta)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    off = build_augmentation(no_aug(), SIZE)
    assert off.identity and off(x, off.sample(6, torch.Generator())) is x
    # the same seed draws the same warps; the crop's area stays within crop_scale, shifts within the jitter
    assert torch.equal(theta, aug.sample(6, torch.Generator().manual_seed(0)))
    many = build_augmentation(InversionConfig(jitter=2, crop_scale=(0.8, 1.0)), SIZE).sample(500, torch.Generator())
    side = many[:, 1, 1]
    assert (side.square() >= 0.8 - 1e-6).all() and (side <= 1).all() and torch.equal(many[:, 0, 0], side)
    assert (many[:, :, 2].abs() <= (1 - side)[:, None] + 2 * 2 / SIZE + 1e-6).all()


def test_augmentation_warps_are_the_shift_crop_and_flip_they_say():
    aug = RandomAffineAugment(jitter=2, crop_scale=(0.5, 1.0), flip=True, image_size=8)
    x = torch.arange(64.0).view(1, 1, 8, 8)

    def warp(side=1.0, mirror=1.0, dx=0.0, dy=0.0):
        # a shift right by dx pixels reads the input dx pixels to the left (normalised: 2 / 8 per pixel)
        return aug(x, torch.tensor([[[side * mirror, 0, -dx * 2 / 8], [0, side, -dy * 2 / 8]]]))[0, 0]

    assert torch.allclose(warp(), x[0, 0], atol=1e-5)
    assert torch.allclose(warp(mirror=-1), x[0, 0].flip(-1), atol=1e-5)
    shifted = warp(dx=1)
    assert torch.allclose(shifted[:, 1:], x[0, 0, :, :-1], atol=1e-5)  # content moved one pixel right
    assert torch.allclose(shifted[:, 0], x[0, 0, :, 0], atol=1e-5)  # and the border repeats
    down = warp(dy=2)
    assert torch.allclose(down[2:], x[0, 0, :-2], atol=1e-5)
    # a centred half-side crop, resized back: the middle 4x4 pixels at twice the size
    crop = aug(x, torch.tensor([[[0.5, 0, 0], [0, 0.5, 0]]]))[0, 0]
    assert torch.allclose(torch.nn.functional.avg_pool2d(crop[None, None], 2)[0, 0], x[0, 0, 2:6, 2:6], atol=0.6)


# ---------------------------------------------------------------- gradient switch

def test_switch_fires_exactly_by_the_rule():
    switch = GradientSwitch(SwitchConfig(patience=2, warmup=3))
    accs = [0.1, 0.1, 0.1,  # warm-up: never fires, however stale
            0.5, 0.4, 0.5,  # new best, then two without a new maximum (a tie is not one) -> fire
            0.1, 0.2, 0.2, 0.15,  # reset: 0.1 and 0.2 are new maxima, then two stale -> fire
            0.9, 0.95, 0.2]  # new maxima, one stale: not yet
    fired = [switch.update(a) for a in accs]
    assert [i for i, f in enumerate(fired) if f] == [5, 9]
    assert switch.fired == 2 and switch.stale == 1 and switch.best == 0.95


def test_switch_never_fires_during_default_warmup():
    switch = GradientSwitch()
    assert switch.config == SwitchConfig(patience=6, warmup=4000, lambda_adv=10.0)
    assert not any(switch.update(0.5) for _ in range(4000))
    assert [switch.update(0.5) for _ in range(7)] == [False] * 6 + [True]


def test_switch_state_round_trip():
    accs = [0.3, 0.2, 0.2, 0.1, 0.4, 0.4, 0.4, 0.4, 0.1, 0.2]
    reference = GradientSwitch(SwitchConfig(patience=3, warmup=1))
    expected = [reference.update(a) for a in accs]
    first = GradientSwitch(SwitchConfig(patience=3, warmup=1))
    got = [first.update(a) for a in accs[:5]]
    second = GradientSwitch(SwitchConfig(patience=3, warmup=1))
    second.load_state_dict(first.state_dict())
    got += [second.update(a) for a in accs[5:]]
    assert got == expected and any(expected)
    with pytest.raises(ValueError, match="lacks"):
        second.load_state_dict({"iteration": 3})
    with pytest.raises(ValueError, match="NaN"):
        second.update(float("nan"))


@pytest.mark.parametrize("queries", ["all", "correct"])
def test_adversarial_step_raises_the_learners_outer_loss(zoo, queries):
    bank0 = PseudoBank(zoo, images_per_class=5)
    sampler = EpisodeSampler(bank0.class_sizes(), way=5, shot=2, query=3, seed=0)
    spec = sampler.task(0)
    torch.manual_seed(0)
    learner = TinyProtoNet().train()
    switch = GradientSwitch(SwitchConfig(warmup=0, adversarial_queries=queries))

    def outer_after(extra) -> float:
        bank = PseudoBank(zoo, images_per_class=5)
        inversion = EpisodeInversion(zoo, bank, no_aug())
        inversion.step(extra_loss=extra, teachers=[0, 1, 2])
        with torch.no_grad():
            return learner.outer_loss(bank.episode(spec))[0].item()

    plain = outer_after(None)
    adversarial = outer_after(switch.adversarial_loss(learner, spec))
    assert adversarial > plain + 0.1, (plain, adversarial)
    assert all(p.grad is None for p in learner.parameters())  # the bank step leaves the learner's grads alone
    # eval mode too: the adversarial term reaches support and query images of every class of the task
    # (with ``correct``, only the queries still classified correctly: see the next test)
    bank = PseudoBank(zoo, images_per_class=5)
    loss = switch.adversarial_loss(learner.eval(), spec)(bank)
    grads = torch.autograd.grad(loss, [bank.logits[int(c)] for c in spec.classes])
    for k, g in enumerate(grads):
        rows = g.flatten(1).abs().sum(1)  # gradient size per bank image of class k
        assert (rows[spec.support[k]] > 0).all() and (queries == "correct" or (rows[spec.query[k]] > 0).all())


# ---------------------------------------------------------------- grids

def test_grids_are_written_with_the_expected_layout(zoo, tmp_path):
    bank = PseudoBank(zoo, images_per_class=4)
    path = save_bank_grid(bank, tmp_path / "bank.png", classes=range(6), scale=2, labelled=False)
    with Image.open(path) as im:
        assert im.size == (4 * (2 * SIZE + 1) + 1, 6 * (2 * SIZE + 1) + 1)
    episode = bank.episode(EpisodeSampler(bank.class_sizes(), way=3, shot=1, query=2).task(0))
    with Image.open(save_episode_grid(episode, tmp_path / "ep" / "episode.png", scale=1, labelled=False)) as im:
        assert im.size == ((1 + 1 + 2) * (SIZE + 1) + 1, 3 * (SIZE + 1) + 1)
    # labelled: a margin for the row labels (class and teachers) and the support / query headers
    assert class_labels(bank, ["ta", "tb", "tc"])[:2] == ["t0/class0 (ta)", "t0/class1 (ta)"]
    with Image.open(save_bank_grid(bank, tmp_path / "bank_l.png", classes=range(6), scale=2,
                                   teacher_ids=["ta", "tb", "tc"])) as im:
        assert im.size[0] > 4 * (2 * SIZE + 1) + 1 + 7 * len("t0/class0 (ta)") and im.size[1] >= 6 * (2 * SIZE + 1)
    with Image.open(save_episode_grid(episode, tmp_path / "ep_l.png", scale=1)) as im:
        assert im.size[1] > 3 * (SIZE + 1) + 1 + 10  # the header row
    with Image.open(save_training_plot(tmp_path / "training.png", [(1, 0.2), (2, 0.4), (3, 0.3)], [(3, 50.0)],
                                       [2])) as im:
        assert im.size == (700, 350)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when asked for a legend with nothing in it
        with Image.open(save_training_plot(tmp_path / "empty.png", [], [], [])) as im:
            assert im.size == (700, 350)


def test_label_preserving_adversary_stops_pushing_misclassified_queries(zoo):
    bank = PseudoBank(zoo, images_per_class=5)
    spec = EpisodeSampler(bank.class_sizes(), way=5, shot=2, query=3, seed=0).task(0)
    torch.manual_seed(0)
    learner = TinyProtoNet().eval()  # running BN statistics: no coupling between query images
    episode = bank.episode(spec)
    query = episode.query_x.detach().requires_grad_()
    with torch.no_grad():
        logits = learner.query_logits(episode)
    correct = logits.argmax(-1) == episode.query_y
    assert 0 < correct.sum() < len(correct)  # the check needs both kinds of query

    # The masked term, evaluated on an episode whose query images are leaves, so each image's gradient shows.
    class Fixed:
        def episode(self, _):
            return dataclasses.replace(episode, query_x=query)

    loss = GradientSwitch(SwitchConfig(lambda_adv=2.0, adversarial_queries="correct")).adversarial_loss(learner, spec)
    value = loss(Fixed())
    value.backward()
    per_image = query.grad.flatten(1).abs().sum(1)
    assert (per_image[~correct] == 0).all() and (per_image[correct] > 0).all()
    ce = F.cross_entropy(logits, episode.query_y, reduction="none")
    assert value.item() == pytest.approx(-2.0 * (ce * correct).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="adversarial_queries"):
        SwitchConfig(adversarial_queries="wrong")


@pytest.mark.parametrize("a_tv_colour", [1e-2, None])
def test_colour_teachers_take_the_colour_tv_weight_and_grey_ones_a_tv(zoo, a_tv_colour):
    colour = train_teacher(WAYS, "colour", channels=3, seed=5)
    teachers = [zoo[0], colour]
    bank = PseudoBank(teachers, images_per_class=3, seed=0)
    config = no_aug(a_tv=1e-4, a_tv_colour=a_tv_colour)
    loss, parts = EpisodeInversion(teachers, bank, config).teacher_losses([0, 1])
    tv_term = loss - (parts["ce"] + config.a_bn * parts["r_bn"] + config.a_l2 * parts["r_l2"])
    expected = torch.tensor([1e-4, a_tv_colour or 1e-4]) * parts["r_tv"]
    assert parts["r_tv"].min() > 0 and torch.allclose(tv_term.detach(), expected, rtol=1e-4, atol=0), (tv_term, expected)
    assert (config.tv_weight(1), config.tv_weight(3)) == (1e-4, a_tv_colour or 1e-4)
    with pytest.raises(ValueError, match="a_tv_colour"):
        InversionConfig(a_tv_colour=-1.0)


def test_the_first_bn_multiplier_and_the_diversity_term_do_what_they_say(zoo):
    from purer.inversion.synthesizer import within_class_similarity

    net = zoo[0].model
    with BNStatsHook(net) as bn:
        net(torch.rand(6, 1, SIZE, SIZE))
    assert torch.allclose(bn.loss(10.0), 10 * bn.terms[0] + sum(bn.terms[1:]))
    assert torch.allclose(bn.loss(1.0, mean=True), sum(bn.terms) / len(bn.terms))
    same = torch.ones(2, 6, 4)  # two teachers, 3 classes of 2 identical images
    assert torch.allclose(within_class_similarity(same, 2), torch.ones(2))
    apart = torch.eye(4)[[0, 1, 2, 3, 0, 1]].expand(2, 6, 4)  # each class's two images orthogonal
    assert torch.allclose(within_class_similarity(apart, 2), torch.zeros(2))
    assert torch.equal(within_class_similarity(same, 1), torch.zeros(2))
    # minimised, it spreads a class's pseudo images apart in the teacher's feature space
    def similarity_after(a_div):
        bank = PseudoBank(zoo, images_per_class=4, seed=1)
        inversion = EpisodeInversion(zoo, bank, no_aug(a_div=a_div))
        for _ in range(15):
            inversion.step(teachers=[0])
        with torch.no_grad():
            x, _ = bank.teacher_batch(0)
            return float(within_class_similarity(zoo[0].features(x)[None], 4))
    assert similarity_after(5.0) < similarity_after(0.0) - 0.05


def test_a_zoo_of_two_datasets_keeps_each_class_in_its_teachers_contract():
    """A grey 12 px teacher and a colour 16 px teacher share one bank: each class is stored, inverted and
    recognised in its own teacher's input, and pseudo episodes mix them in the bank's common shape."""
    grey = train_teacher(0, "grey", image_size=12)
    colour_config = ModelConfig("conv4", WAYS, [f"colour{k}" for k in range(WAYS)], in_channels=3, image_size=16,
                                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], arch_args={"width": 8, "depth": 2})
    torch.manual_seed(1)
    model = colour_config.build()
    x, y = class_data(5, WAYS, 40, seed=1)
    colour_x = torch.cat([x, x.roll(1, -1), x.flip(-1)], 1)  # three different channels per class
    inputs = prepare_input(colour_x, 3, 16, torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        i = torch.randint(len(y), (32,))
        loss = F.cross_entropy(model(inputs[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    colour = Teacher(model.eval(), colour_config, "colour")
    zoo = [grey, colour]
    bank = PseudoBank(zoo, images_per_class=4, own_contract=True)
    assert bank.image_shape == (3, 16, 16)
    assert [bank.class_shapes[k] for k in (0, WAYS)] == [(1, 12), (3, 16)]
    assert bank.teacher_batch(0)[0].shape == (WAYS * 4, 1, 12, 12)
    assert bank.teacher_batch(1)[0].shape == (WAYS * 4, 3, 16, 16)
    episode = bank.episode(EpisodeSampler(bank.class_sizes(), 4, 1, 2, seed=0).task(0))
    assert episode.support_x.shape[1:] == (3, 16, 16)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=2))
    before = [float(inversion.teacher_loss(i)[1]["acc"]) for i in (0, 1)]
    for _ in range(40):
        inversion.step()
    after = [float(inversion.teacher_loss(i)[1]["acc"]) for i in (0, 1)]
    assert min(after) >= 0.9 and after[0] > before[0] and after[1] > before[1], (before, after)
    grey_images = bank.snapshot([0])[0]  # a grey class in the common shape: three equal channels
    assert torch.allclose(grey_images[:, 0], grey_images[:, 1]) and torch.allclose(grey_images[:, 1], grey_images[:, 2])

"""Zoo distillation during ECI (purer.distill) and the meta.init=zoo-student pre-phase (purer.student)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from meta_synthetic import ARCH_ARGS, template_images, tiny_teacher
from purer.data import EpisodeSampler, ImageSet
from purer.distill import (DistillConfig, ZooDistillation, cosine_kernel, distillation_loss, relation_distance,
                           teacher_agreement)
from purer.student import zoo_student
from purer.evaluate import evaluate, paired_difference, task_list
from purer.inversion import EpisodeInversion, InversionConfig, PseudoBank
from purer.pipeline import checkpointed_state
from purer.meta import InputSpec, ProtoNet, batch_stats_only, meta_step, random_model, with_new_head
from purer.zoo import ModelConfig, Teacher, build_model
from recipe_runs import accuracies, overrides, recipe


@pytest.fixture(scope="module")
def zoo():
    """Four 8 px teachers on disjoint 3-class blocks."""
    data = template_images(num_classes=12)
    return [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i) for i in range(4)]


def distilled(zoo, steps: int):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=2))
    return zoo_student(zoo, bank, inversion, "conv4", steps, seed=0, arch_args=ARCH_ARGS), bank, inversion


def test_distillation_loss_is_the_tempered_kl_to_the_teacher():
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    expected = (F.softmax(t / 4, -1) * (F.log_softmax(t / 4, -1) - F.log_softmax(s / 4, -1))).sum(-1).mean() * 16
    assert torch.allclose(distillation_loss(s, t, temperature=4.0), expected, atol=1e-6)
    assert distillation_loss(t, t).abs() < 1e-6


def test_the_student_comes_to_agree_with_the_teachers(zoo):
    student, bank, inversion = distilled(zoo, 60)
    assert student.head.out_features == bank.num_classes == 12 and inversion.steps == 60
    untrained = batch_stats_only(random_model("conv4", 12, 1, 8, ARCH_ARGS, seed=0))
    before, after = teacher_agreement(untrained, zoo, bank), teacher_agreement(student, zoo, bank)
    assert after >= 0.8 and before < 0.6, (before, after)  # chance is 1/3


def test_distillation_is_deterministic_so_processes_agree(zoo):
    (a, bank_a, _), (b, bank_b, _) = distilled(zoo, 5), distilled(zoo, 5)
    assert torch.equal(bank_a.snapshot(), bank_b.snapshot())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_checks_its_inputs(zoo):
    bank = PseudoBank(zoo, images_per_class=2)
    inversion = EpisodeInversion(zoo, bank)
    with pytest.raises(ValueError, match="steps >= 1"):
        zoo_student(zoo, bank, inversion, "conv4", 0, seed=0)
    with pytest.raises(ValueError, match="given bank"):
        zoo_student(zoo, PseudoBank(zoo, images_per_class=2), inversion, "conv4", 1, seed=0)


def test_a_new_head_keeps_the_encoder_and_is_seeded(zoo):
    student = distilled(zoo, 2)[0]
    model = with_new_head(student, 5, seed=1)
    assert model.head.out_features == 5 and student.head.out_features == 12
    assert all(torch.equal(p, q) for p, q in zip(model.encoder.parameters(), student.encoder.parameters()))
    assert torch.equal(model.head.weight, with_new_head(student, 5, seed=1).head.weight)
    assert all(p.requires_grad for p in model.parameters())


def test_a_distilled_run_completes_and_a_resumed_one_keeps_its_pre_phase(tiny_root, tmp_path):
    """The pre-phase's result and its time come from the checkpoint (the resumed run reports the first
    session's time, and gives the uninterrupted run's rows)."""
    fast = {"meta.init": "zoo-student", "meta.zoo_student_steps": 5, "eval.baselines": "[]", "eval.calibrations": "[]"}
    out = tmp_path / "distilled"
    res = recipe(overrides(tiny_root, out, 4, **fast))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["meta_train"]["seconds_zoo_student"] > 0
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint_2", resumed / "checkpoints" / "checkpoint_2")
    first = checkpointed_state(resumed / "checkpoints" / "checkpoint_2", "state")["seconds"]["zoo_student"]
    assert first > 0
    res = recipe(overrides(tiny_root, resumed, 4, **fast) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["meta_train"]["seconds_zoo_student"] == round(first, 1)
    assert accuracies(resumed) == accuracies(out)


# ---------------------------------------------------------------- zoo distillation during ECI

def test_the_distillation_loss_is_a_true_kl_divergence():
    torch.manual_seed(0)
    t = torch.randn(5, 4, dtype=torch.float64)
    assert distillation_loss(t, t) == 0  # exactly zero when the distributions match
    assert distillation_loss(t + 3.0, t) < 1e-12  # the same distributions (softmax ignores a shift)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert distillation_loss(s, t) > 0
    # the successors' call (probabilities as F.kl_div's first argument) is not a divergence: not 0 at a match
    p = F.softmax(t / 4, -1)
    assert F.kl_div(p, p, reduction="batchmean").abs() > 0.1
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t, 2.0), (s,))
    # its gradient is the tempered softmax difference: (softmax(s/T) - softmax(t/T)) * T / B
    g, = torch.autograd.grad(distillation_loss(s, t, 2.0), s)
    assert torch.allclose(g, (F.softmax(s / 2, -1) - F.softmax(t / 2, -1)) * 2 / 5)


def shifted_glyphs(num_classes: int = 20, per_class: int = 20, seed: int = 0, size: int = 12) -> ImageSet:
    """Each class a 3x3 binary motif (6x6 px) placed anywhere on a 12x12 canvas, plus noise: raw pixels do
    poorly on new classes; conv features learnt on other classes (the teachers') do better."""
    g = torch.Generator().manual_seed(seed)
    motifs = F.interpolate(torch.rand(num_classes, 1, 3, 3, generator=g).round(), size=(6, 6))
    x = torch.zeros(num_classes * per_class, 1, size, size)
    for k in range(len(x)):
        dx, dy = torch.randint(0, size - 5, (2,), generator=g).tolist()
        x[k, :, dy:dy + 6, dx:dx + 6] = motifs[k // per_class]
    x = (0.8 * x + 0.1 + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return ImageSet(x, torch.arange(num_classes).repeat_interleave(per_class), [f"m{i}" for i in range(num_classes)])


def shifted_teacher(data: ImageSet, classes: list[int], seed: int) -> Teacher:
    torch.manual_seed(seed)
    size = data.image_shape[-1]
    sub = data.subset(classes)
    model = build_model("conv4", len(classes), 1, size, ARCH_ARGS)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = (sub.float_images() - 0.5) / 0.25, sub.labels
    model.train()
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    config = ModelConfig("conv4", len(classes), [data.class_names[c] for c in classes], 1, size, [0.5], [0.25],
                         arch_args=dict(ARCH_ARGS))
    return Teacher(model.eval(), config, f"t{seed}")


@pytest.fixture(scope="module")
def shifted_zoo():
    """Four teachers on disjoint 3-class blocks of 12 motif classes, and a bank inverted from them; 8 classes
    are held out."""
    data = shifted_glyphs()
    zoo = [shifted_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i) for i in range(4)]
    bank = PseudoBank(zoo, images_per_class=6)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=4))
    for _ in range(80):
        inversion.step()
    return data, zoo, bank


def train_on_the_bank(zoo, bank, config: DistillConfig, steps: int) -> tuple[ProtoNet, list[dict]]:
    """A ProtoNet meta-trained on pseudo episodes of the bank, with ``config``'s zoo distillation beside."""
    size = bank.image_size
    learner = ProtoNet(random_model("conv4", 3, 1, size, ARCH_ARGS, seed=1), InputSpec(1, size, (0.5,), (0.25,)))
    distillation = ZooDistillation(zoo, learner.embed(torch.zeros(2, 1, size, size)).shape[-1], config, seed=0)
    optimizer = torch.optim.Adam([*learner.parameters(), *distillation.parameters()], lr=3e-3)
    sampler, history = EpisodeSampler(bank.class_sizes(), 3, 1, 3, seed=0), []
    for it in range(steps):
        with torch.no_grad():
            episodes = [bank.episode(sampler.task(2 * it + j)).detach() for j in range(2)]
        terms, stats = distillation.losses(learner, bank, distillation.sample_teachers(), it) \
            if config.active else ([], {})
        meta_step(learner, optimizer, episodes, extra=terms)
        history.append({k: float(v) for k, v in stats.items()})
    return learner, history


def test_feature_distillation_brings_the_learner_onto_the_teachers_features(shifted_zoo):
    _, zoo, bank = shifted_zoo
    _, history = train_on_the_bank(zoo, bank, DistillConfig(feature=1.0, augment=False), 60)
    first, last = history[0]["feature_cos"], history[-1]["feature_cos"]
    assert last < 0.5 * first, (first, last)  # 1 - cosine to each teacher's penultimate features, halved or better


def test_the_relation_distance_is_zero_on_the_target_geometry_and_follows_the_whole_step():
    torch.manual_seed(0)
    f = torch.randn(6, 4, dtype=torch.float64)
    kernel = cosine_kernel(f)
    assert torch.allclose(kernel.diagonal(), torch.ones(6, dtype=torch.float64))
    assert relation_distance(3 * f + 1, kernel) < 1e-20  # only directions from the batch's mean count
    e = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert relation_distance(e, kernel) > 0
    assert torch.autograd.gradcheck(lambda x: relation_distance(x, kernel), (e,))


def test_relational_distillation_brings_the_learner_onto_the_zoos_similarities(shifted_zoo):
    _, zoo, bank = shifted_zoo
    _, history = train_on_the_bank(zoo, bank, DistillConfig(logit=0.0, relation=30.0, augment=False), 60)
    first, last = history[0]["relation"], history[-1]["relation"]
    assert last < 0.5 * first, (first, last)


def test_a_process_distilling_its_share_of_the_step_follows_the_whole_steps_similarities(zoo):
    """Split over processes (a teacher a work item: ``images: own``), each one's teachers follow the same ensemble as
    one process distilling them all."""
    bank = PseudoBank(zoo, images_per_class=2)
    learner = ProtoNet(random_model("conv4", 3, 1, 8, ARCH_ARGS, seed=0))
    distillation = ZooDistillation(zoo, learner.embed(torch.zeros(2, 1, 8, 8)).shape[-1],
                                   DistillConfig(logit=1.0, relation=1.0, augment=False, images="own"))
    whole, _ = distillation.losses(learner, bank, [0, 1, 3], step=2)
    share, _ = distillation.losses(learner, bank, [1], step=2, ensemble=[0, 1, 3])
    alone, _ = distillation.losses(learner, bank, [1], step=2)
    assert torch.allclose(share[0], whole[1]) and not torch.allclose(alone[0], whole[1])


def test_a_distilled_learner_beats_an_undistilled_one_on_held_out_classes(shifted_zoo):
    data, zoo, bank = shifted_zoo
    held_out = data.subset(list(range(12, 20)))
    tasks = task_list(held_out, 5, 1, 5, 200, 0)
    plain, _ = train_on_the_bank(zoo, bank, DistillConfig(logit=0.0), 100)
    distilled_, _ = train_on_the_bank(zoo, bank, DistillConfig(logit=1.0, feature=1.0), 100)
    a = evaluate(plain, held_out, tasks, progress=False)
    b = evaluate(distilled_, held_out, tasks, progress=False)
    gain, ci = paired_difference(b, a)
    assert gain - ci > 0, (a.accuracy, b.accuracy, gain, ci)  # measured here: 34.2 -> 38.9


def test_distillation_heads_and_maps_follow_the_zoo_and_checkpoint(zoo):
    distillation = ZooDistillation(zoo, 32, DistillConfig(logit=1.0, feature=0.5, teachers_per_step=2), seed=3)
    assert [h.out_features for h in distillation.heads] == [3] * 4
    assert [m.out_features for m in distillation.maps] == [t.model.feature_dim for t in zoo]
    picks = [distillation.sample_teachers() for _ in range(3)]
    state = distillation.state_dict()
    again = ZooDistillation(zoo, 32, DistillConfig(logit=1.0, feature=0.5, teachers_per_step=2), seed=9)
    again.load_state_dict(state)
    assert again.sample_teachers() == distillation.sample_teachers() and all(len(p) == 2 for p in picks)
    assert not list(ZooDistillation(zoo, 32, DistillConfig(logit=0.0)).parameters())  # PURER as published: none
    with pytest.raises(ValueError, match="weights must be >= 0"):
        DistillConfig(logit=-1.0)


# ---------------------------------------------------------------- union-label distillation

def test_union_heads_on_a_disjoint_zoo_are_the_per_teacher_heads(zoo):
    """On a zoo whose teachers share no class, one head over the union with each teacher supervising its own rows
    is the per-teacher heads: with the same weights, the same losses."""
    bank = PseudoBank(zoo, images_per_class=2)
    learner = ProtoNet(random_model("conv4", 3, 1, 8, ARCH_ARGS, seed=0))
    feature_dim = learner.embed(torch.zeros(2, 1, 8, 8)).shape[-1]
    # a term per teacher (images: own), so each teacher's loss is compared
    per_teacher = ZooDistillation(zoo, feature_dim, DistillConfig(heads="teacher", images="own"),
                                  classes=bank.teacher_classes)
    union = ZooDistillation(zoo, feature_dim, DistillConfig(heads="union", images="own"), classes=bank.teacher_classes)
    assert len(union.heads) == 1 and union.heads[0].out_features == bank.num_classes == 12
    with torch.no_grad():
        for i, head in enumerate(per_teacher.heads):
            union.heads[0].weight[bank.teacher_classes[i]] = head.weight
            union.heads[0].bias[bank.teacher_classes[i]] = head.bias
    a, _ = per_teacher.losses(learner, bank, [0, 2, 3], step=5)
    b, _ = union.losses(learner, bank, [0, 2, 3], step=5)
    assert torch.allclose(torch.stack(a), torch.stack(b), atol=1e-6)


def test_teachers_sharing_a_class_push_the_same_logit():
    data = template_images(num_classes=5)
    shared = [tiny_teacher(data, [0, 1, 2], seed=0), tiny_teacher(data, [2, 3, 4], seed=1)]  # class 2 in both
    bank = PseudoBank(shared, images_per_class=2, merge_shared_classes=True)
    assert bank.num_classes == 5 and bank.teacher_classes[0][2] == bank.teacher_classes[1][0]
    learner = ProtoNet(random_model("conv4", 3, 1, 8, ARCH_ARGS, seed=0))
    distill = ZooDistillation(shared, 32, DistillConfig(heads="union"), classes=bank.teacher_classes)
    row = bank.teacher_classes[0][2]
    for teacher in (0, 1):  # each teacher's loss moves the shared class's row of the one head
        distill.zero_grad()
        distill.losses(learner, bank, [teacher], step=0)[0][0].backward()
        assert distill.heads[0].weight.grad[row].abs().sum() > 0
        others = [k for k in range(5) if k not in bank.teacher_classes[teacher]]
        assert distill.heads[0].weight.grad[others].abs().sum() == 0


def test_without_shared_class_ids_each_teacher_keeps_its_own_classes():
    data = template_images(num_classes=5)
    shared = [tiny_teacher(data, [0, 1, 2], seed=0), tiny_teacher(data, [2, 3, 4], seed=1)]
    bank = PseudoBank(shared, images_per_class=2, merge_shared_classes=False)  # the bank keeps them apart
    distill = ZooDistillation(shared, 32, DistillConfig(heads="union"), classes=bank.teacher_classes)
    assert distill.heads[0].out_features == 6
    assert not set(bank.teacher_classes[0]) & set(bank.teacher_classes[1])
    with pytest.raises(ValueError, match="heads"):
        DistillConfig(heads="shared")


def test_standardized_distillation_ignores_the_teachers_logit_scale():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    plain = distillation_loss(s, t, 4.0)
    assert not torch.isclose(distillation_loss(s, 5 * t, 4.0), plain)  # a sharper teacher asks for more
    standardized = distillation_loss(s, t, 4.0, standardize=True)
    for scale, shift in ((5.0, 0.0), (0.2, 3.0)):
        assert torch.isclose(distillation_loss(s, scale * t + shift, 4.0, standardize=True), standardized, atol=1e-5)
    assert distillation_loss(3 * t + 1, t, 4.0, standardize=True) < 1e-8  # the same ranking and gaps: nothing left


def test_distilling_on_the_steps_images_asks_each_teacher_about_the_others_classes(zoo, monkeypatch):
    """``images: step``: the step is one work item whose term is the sum of every distilled teacher's KD on the
    images of all the step's teachers, which the learner embeds once; with ``own`` each teacher is an item."""
    bank = PseudoBank(zoo, images_per_class=2)
    learner = ProtoNet(random_model("conv4", 3, 1, 8, ARCH_ARGS, seed=0))
    config = DistillConfig(logit=1.0, images="step", augment=False)
    distillation = ZooDistillation(zoo, learner.embed(torch.zeros(2, 1, 8, 8)).shape[-1], config)
    step = [0, 1, 3]
    assert distillation.work_items(step) == [step] and distillation.work_items([]) == []
    embedded = []
    embed = learner.embed
    monkeypatch.setattr(learner, "embed", lambda x: embedded.append(len(x)) or embed(x))
    whole, stats = distillation.losses(learner, bank, step, step=2)
    x = torch.cat([bank.teacher_images(i) for i in step])
    assert embedded == [len(x)] and len(whole) == 1
    expected = []
    for i in step:
        with torch.no_grad():
            target = zoo[i].model.head(zoo[i].features(x))
        expected.append(distillation_loss(distillation.student_logits(i, embed(x)), target, config.temperature))
    assert torch.allclose(whole[0], sum(expected)) and torch.allclose(stats["logit_kd"], sum(expected) / len(step))
    own = ZooDistillation(zoo, distillation.heads[0].in_features, DistillConfig(logit=1.0, images="own", augment=False))
    assert own.work_items(step) == [[0], [1], [3]]
    assert not torch.allclose(own.losses(learner, bank, step, step=2)[0][0], expected[0])  # its own classes' alone
    # the relational term on the shared views: the ensemble's kernel once, not once per teacher
    related = ZooDistillation(zoo, distillation.heads[0].in_features,
                              DistillConfig(logit=0.0, relation=1.0, images="step", augment=False))
    passes = []
    for t in zoo:
        monkeypatch.setattr(t, "features", lambda y, f=t.features: passes.append(len(y)) or f(y))
    term, stats = related.losses(learner, bank, step, step=2)
    assert passes == [len(x)] * (len(step) + len(step) - 1)  # each teacher's target, the others' once for the kernel
    with torch.no_grad():
        kernel = torch.stack([cosine_kernel(zoo[i].features(x)) for i in step]).mean(0)
    assert torch.allclose(term[0], len(step) * relation_distance(embed(x), kernel))
    assert torch.allclose(stats["relation"], relation_distance(embed(x), kernel))
    with pytest.raises(ValueError, match="distill.images must be one of"):
        DistillConfig(images="all")


def test_what_a_zoo_is_distilled_on_follows_its_rule():
    """``distill.images`` (``step``) for every zoo but one of colour teachers, ``images_colour`` (``own``) there; the
    rule of several architectures is off (null) by default and decides where it is set, after the colour rule, as
    the synthesizer's rules do."""
    def models(*kinds):
        return [ModelConfig(arch, 2, ["a", "b"], in_channels=channels) for arch, channels in kinds]

    grey, colour = models(("conv4", 1), ("conv4", 1)), models(("conv4", 3), ("conv4", 3))
    mixed, both = models(("conv4", 1), ("resnet10", 1)), models(("conv4", 3), ("resnet10", 3))
    config = DistillConfig()
    assert [config.images_for(z) for z in (grey, colour, mixed, both)] == ["step", "own", "step", "own"]
    assert [config.images_key(z) for z in (grey, colour, mixed, both)] == [
        "images", "images_colour", "images", "images_colour"]
    assert DistillConfig(images_colour=None).images_for(both) == "step"
    assert DistillConfig(images_heterogeneous="own").images_key(mixed) == "images_heterogeneous"
    assert DistillConfig(images_heterogeneous="own").images_key(both) == "images_colour"
    assert DistillConfig(images_colour=None, images_heterogeneous="own").images_for(both) == "own"
    assert DistillConfig(images="own", images_heterogeneous="step").images_for(mixed) == "step"
    assert config.images_for(models(("conv4", 1), ("conv4", 3))) == "step"  # grey and colour: no colour rule
    for key in ("images", "images_colour", "images_heterogeneous"):
        with pytest.raises(ValueError, match=f"distill.{key} must be one of"):
            DistillConfig(**{key: "all"})


def test_the_distillation_takes_its_zoos_rule(zoo):
    """:class:`ZooDistillation` distils a grey zoo of one architecture on the step's images by default, and on each
    teacher's own with the rule for such a zoo set so; a colour rule does not apply to grey teachers."""
    assert all(t.config.in_channels == 1 and t.config.arch == zoo[0].config.arch for t in zoo)
    assert ZooDistillation(zoo, 8, DistillConfig()).images == "step"
    assert ZooDistillation(zoo, 8, DistillConfig(images="own", images_colour="step")).images == "own"
    assert ZooDistillation(zoo, 8, DistillConfig(images="own")).work_items([0, 2]) == [[0], [2]]


def test_the_steps_images_of_teachers_of_two_input_sizes_meet_in_the_banks_shape(zoo):
    """``images: step`` over teachers whose classes come in different shapes (8 and 12 px): the step's images are
    brought to the bank's common shape before the teachers and the learner read them all."""
    from purer.zoo.teacher import convert_input

    big = ModelConfig("conv4", 3, ["x0", "x1", "x2"], in_channels=1, image_size=12, mean=[0.5], std=[0.25],
                      arch_args=dict(ARCH_ARGS))
    torch.manual_seed(0)
    mixed = [*zoo[:2], Teacher(build_model("conv4", 3, 1, 12, ARCH_ARGS).eval(), big, "big")]
    bank = PseudoBank(mixed, images_per_class=2, own_contract=True)  # each class in its teacher's shape
    assert {bank.teacher_images(i).shape[-1] for i in range(3)} == {8, 12} and bank.image_size == 12
    learner = ProtoNet(random_model("conv4", 3, 1, 12, ARCH_ARGS, seed=0))  # on the bank's shape, as in ECI
    config = DistillConfig(logit=1.0, images="step", augment=False)
    distillation = ZooDistillation(mixed, learner.embed(torch.zeros(2, 1, 12, 12)).shape[-1], config)
    whole, _ = distillation.losses(learner, bank, [0, 1, 2], step=0)
    x = torch.cat([convert_input(bank.teacher_images(i), bank.channels, bank.image_size) for i in range(3)])
    expected = 0
    for i in range(3):
        with torch.no_grad():
            target = mixed[i].model.head(mixed[i].features(x))
        expected = expected + distillation_loss(distillation.student_logits(i, learner.embed(x)), target,
                                                config.temperature)
    assert torch.allclose(whole[0], expected)

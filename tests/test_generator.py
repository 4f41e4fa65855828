"""The generator synthesizer (``inversion.synthesizer: generator``) on the tiny synthetic zoo of test_inversion."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from purer.data import EpisodeSampler
from purer.inversion import (GeneratorConfig, GeneratorInversion, GradientSwitch, InversionConfig, PseudoBank,
                             SwitchConfig, build_synthesizer)
from purer.inversion.draws import augmentation_draws
from purer.inversion.synthesizer import EpisodeInversion
from purer.yaml_config import ConfigError, load_config
from purer.pipeline import RunConfig
from test_inversion import WAYS, TinyProtoNet, resumes_from_its_state, train_teacher


@pytest.fixture(scope="module")
def zoo():
    return [train_teacher(WAYS * i, f"t{i}", seed=i) for i in range(3)]


def generator(zoo, seed=0, steps=2, lr=1e-2, per_class=3, **bank_kw):
    bank = PseudoBank(zoo, images_per_class=per_class, **bank_kw)
    config = InversionConfig(seed=seed, synthesizer="generator", generator=GeneratorConfig(steps=steps, lr=lr))
    return bank, build_synthesizer(zoo, bank, config)


def teacher_accuracy(zoo, bank) -> float:
    with torch.no_grad():
        hits = [(t(bank.teacher_images(i)).argmax(-1) == torch.arange(WAYS).repeat_interleave(bank.images_per_class))
                .float().mean() for i, t in enumerate(zoo)]
    return float(torch.stack(hits).mean())


def test_the_config_names_the_synthesizer():
    cfg = load_config(RunConfig, None, ["inversion.synthesizer=generator", "inversion.generator.steps=3"])
    assert cfg.inversion.synthesizer == "generator" and cfg.inversion.generator.steps == 3
    assert InversionConfig().synthesizer == "pixels"
    with pytest.raises(ConfigError, match="synthesizer must be one of"):
        load_config(RunConfig, None, ["inversion.synthesizer=gan"])
    with pytest.raises(ConfigError, match="steps >= 1"):
        load_config(RunConfig, None, ["inversion.generator.steps=0"])


def test_the_generator_makes_the_teachers_recognise_the_bank(zoo):
    """Its images start as what an untrained generator draws and end as what every teacher calls its classes."""
    bank, inv = generator(zoo)
    assert isinstance(inv, GeneratorInversion)
    inv.step(teachers=[0, 1, 2])
    before = teacher_accuracy(zoo, bank)
    ce = []
    for _ in range(25):
        ce.append(float(inv.step(teachers=[0, 1, 2])["ce"]))
    after = teacher_accuracy(zoo, bank)
    # after one step (two adaptation steps per teacher) the teachers already recognise about half of it: 0.60 on
    # one machine, so a bound of 0.6 failed there by one image
    assert before < 0.8 and after > 0.95, (before, after)
    assert ce[-1] < 0.5 * ce[0]


def test_a_step_writes_its_teachers_classes_only_and_moves_the_meta_generator(zoo):
    bank, inv = generator(zoo)
    images, weights = bank.snapshot(), [p.detach().clone() for p in inv.generator.parameters()]
    stats = inv.step(teachers=[1])
    mine = set(bank.teacher_classes[1])
    for c in range(bank.num_classes):
        assert torch.equal(bank.snapshot([c]), images[c:c + 1]) != (c in mine)
    assert any(not torch.equal(a, b) for a, b in zip(weights, inv.generator.parameters()))
    assert set(stats) == {"loss", "ce", "r_bn", "r_tv", "r_l2", "acc"} and inv.steps == 1
    assert float(bank.snapshot().min()) >= 0 and float(bank.snapshot().max()) <= 1


def test_with_one_adaptation_step_the_meta_gradient_is_the_teacher_loss_gradient_at_the_meta_weights(zoo):
    """First order, as FREE's: the last adaptation step's gradient; with one step, that of L_EI at theta."""
    _, inv = generator(zoo, steps=1)
    grad, images, parts = inv.adapt(2)
    classes = np.repeat(np.asarray(inv.bank.teacher_classes[2]), inv.bank.images_per_class)
    x = inv.render(inv.generator, classes, 2)
    thetas = augmentation_draws(inv.augment, (inv.config.seed, 2, 0), 0, [2], [len(classes)], "cpu")
    loss, _ = inv.teacher_losses([2], thetas, {2: (x, torch.arange(WAYS).repeat_interleave(3))})
    expected = torch.autograd.grad(loss[0], list(inv.generator.parameters()))
    assert torch.allclose(grad, torch.cat([g.reshape(-1) for g in expected]), atol=1e-6)
    assert torch.allclose(images, x.detach()) and torch.isclose(parts["loss"], loss[0])


def test_more_adaptation_steps_fit_the_teacher_better(zoo):
    losses = {}
    for steps in (1, 8):
        _, inv = generator(zoo, steps=steps, lr=1e-2)
        losses[steps] = float(inv.adapt(0)[2]["ce"])
    assert losses[8] < losses[1]


def test_the_adversarial_term_reaches_the_meta_generator_through_a_task_it_renders(zoo):
    bank, inv = generator(zoo)
    spec = EpisodeSampler(bank.class_sizes(), way=3, shot=1, query=2, seed=0).task(0)
    read = []

    def extra(source):  # an adversarial term reads a pseudo episode of `spec`, as the switch's does
        episode = source.episode(spec)
        read.append(episode)
        return -10 * episode.query_x.mean()

    plain_bank, plain = generator(zoo)
    plain.step(teachers=[0])
    images = bank.snapshot()
    stats = inv.step(extra_loss=extra, teachers=[0])
    episode = read[0]
    assert episode.support_x.shape == (3, 1, 16, 16) and episode.query_x.shape == (6, 1, 16, 16)
    assert episode.classes == tuple(bank.class_names[int(c)] for c in spec.classes)
    assert torch.isclose(stats["extra"], -10 * episode.query_x.mean().detach())
    moved = [not torch.equal(a, b) for a, b in zip(inv.generator.parameters(), plain.generator.parameters())]
    assert any(moved)
    # the bank is written by the adaptations only: the adversarial task's other classes wait for their teachers
    for c in set(range(bank.num_classes)) - set(bank.teacher_classes[0]):
        assert torch.equal(bank.snapshot([c]), images[c:c + 1])
    # the switch's own term runs on the rendered task too
    learner = TinyProtoNet()
    switch_term = GradientSwitch(SwitchConfig()).adversarial_loss(learner, spec)
    assert float(inv.step(extra_loss=switch_term, teachers=[1])["extra"]) <= 0
    assert not any(p.grad is not None for p in learner.parameters())


def test_a_generator_step_split_over_processes_is_bit_for_bit_the_whole_step(zoo):
    learner = TinyProtoNet()

    def extra():
        spec = EpisodeSampler([3] * 15, way=3, shot=1, query=2, seed=1).task(0)
        return GradientSwitch(SwitchConfig()).adversarial_loss(learner, spec)

    whole_bank, whole = generator(zoo, seed=5)
    whole_stats = whole.step(extra_loss=extra(), teachers=[0, 1, 2])

    class Recorded(Exception):
        pass

    other: dict[int, torch.Tensor] = {}

    def record(terms):
        other.update(terms)
        raise Recorded

    _, second = generator(zoo, seed=5)
    with pytest.raises(Recorded):  # the second process's share: teacher 1 and the adversarial term
        second.step(extra_loss=extra(), teachers=[1], total=3, sync=record)
    assert set(other) == {1, 3} and all(len(v) == second.term_size(k) for k, v in other.items())
    bank, first = generator(zoo, seed=5)
    stats = first.step(teachers=[0, 2], total=3, sync=lambda terms: {**terms, **other})
    assert torch.equal(bank.snapshot(), whole_bank.snapshot())
    assert all(torch.equal(a, b) for a, b in zip(first.generator.parameters(), whole.generator.parameters()))
    assert all(torch.equal(stats[k], whole_stats[k]) for k in whole_stats)


def test_the_generator_resumes_from_its_state(zoo, tmp_path):
    resumes_from_its_state(lambda: generator(zoo), tmp_path / "ckpt.pt")


def test_a_zoo_of_two_input_contracts_gets_each_class_in_its_teachers_contract(zoo):
    """A colour 20 px teacher beside the grey 16 px ones: the generator renders the bank's common shape, each
    teacher sees it through its own contract, and each class is stored in its teacher's."""
    colour = train_teacher(15, "c0", image_size=20, channels=3, mean=0.4, std=0.3, seed=9)
    mixed = [*zoo[:2], colour]
    bank, inv = generator(mixed, own_contract=True)
    assert bank.image_shape == (3, 20, 20)
    for _ in range(15):
        inv.step(teachers=[0, 1, 2])
    assert bank.logits[bank.teacher_classes[0][0]].shape[1:] == (1, 16, 16)
    assert bank.logits[bank.teacher_classes[2][0]].shape[1:] == (3, 20, 20)
    assert teacher_accuracy(mixed, bank) > 0.9


def test_the_pixel_bank_stays_the_default_synthesizer_but_for_a_zoo_of_colour_teachers(zoo):
    """``inversion.synthesizer_colour``: a zoo whose teachers all take colour input gets the one-step generator;
    a grey zoo, a zoo mixing grey and colour teachers, or the rule switched off keep ``synthesizer``."""
    def built(teachers, **config):
        return type(build_synthesizer(teachers, PseudoBank(teachers, images_per_class=3), InversionConfig(**config)))

    colour = [train_teacher(WAYS * i, f"c{i}", channels=3, mean=0.4, std=0.3, seed=i) for i in range(2)]
    assert built(zoo) is EpisodeInversion and built([*zoo[:1], colour[0]]) is EpisodeInversion
    assert built(colour) is GeneratorInversion and built(colour, synthesizer_colour=None) is EpisodeInversion
    assert built(zoo, synthesizer="generator") is GeneratorInversion
    assert built(colour, synthesizer="generator", synthesizer_colour="pixels") is EpisodeInversion
    assert dataclasses.asdict(InversionConfig())["generator"]["steps"] == 1
    assert InversionConfig().synthesizer_for([]) == "pixels"
    with pytest.raises(ValueError, match="synthesizer_colour must be one of"):
        InversionConfig(synthesizer_colour="gan")


def test_a_zoo_of_several_architectures_gets_the_generator(zoo):
    """``inversion.synthesizer_heterogeneous``: teachers of more than one architecture (SH) get the generator; one
    architecture keeps ``synthesizer``; the colour rule is asked first; null switches the rule off."""
    from purer.zoo import ModelConfig, Teacher

    def teacher(arch, channels=1, **args):
        config = ModelConfig(arch, WAYS, [f"{arch}{k}" for k in range(WAYS)], in_channels=channels, image_size=16,
                             mean=[0.5], std=[0.25], arch_args=args)
        return Teacher(config.build(), config, arch)

    def key(teachers, **config):
        return InversionConfig(**config).synthesizer_key(t.config for t in teachers)

    mixed = [*zoo[:2], teacher("resnet10", width=8)]
    built = type(build_synthesizer(mixed, PseudoBank(mixed, images_per_class=3), InversionConfig()))
    assert built is GeneratorInversion and key(mixed) == "synthesizer_heterogeneous"
    assert key(zoo) == "synthesizer"  # several Conv4s of one width: one architecture
    assert key(mixed, synthesizer_heterogeneous=None) == "synthesizer"
    assert InversionConfig(synthesizer_heterogeneous="pixels").synthesizer_for(t.config for t in mixed) == "pixels"
    colour = [teacher("conv4", 3, width=8, depth=2), teacher("resnet10", 3, width=8)]
    assert key(colour) == "synthesizer_colour" and key(colour, synthesizer_colour=None) == "synthesizer_heterogeneous"
    with pytest.raises(ValueError, match="synthesizer_heterogeneous must be one of"):
        InversionConfig(synthesizer_heterogeneous="gan")


def test_a_generator_run_on_two_processes_or_resumed_is_the_one_process_run(tiny_root, tmp_path):
    """The recipe with ``inversion.synthesizer=generator``: two processes compute the one-process run bit for
    bit (bank, learner, generator and every row), and a run resumed from its checkpoint finishes the same."""
    import json
    import shutil
    import sys

    from recipe_runs import ITERATIONS, REPO, recipe, overrides
    from purer.pipeline.checkpoints import checkpointed_state
    from test_pipeline import identical

    def args(out):
        return overrides(tiny_root, out, **{"inversion.synthesizer": "generator", "inversion.generator.steps": 2,
                                            "eval.baselines": "[]", "eval.calibrations": "[]"})

    def without_times(out) -> dict:
        results = json.loads((out / "results.json").read_text())
        for k in ("seconds", "processes", "run_id"):
            results.pop(k)
        for r in results["rows"]:
            r.pop("seconds", None)
        results["meta_train"] = {k: v for k, v in results["meta_train"].items() if not k.startswith("seconds")}
        return results

    one, two = tmp_path / "one", tmp_path / "two"
    res = recipe(args(one))
    assert res.returncode == 0, res.stderr[-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes" / "accelerate" / "two-processes.yaml")]
    res = recipe(args(two), launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((one / "results.json").read_text())["meta_train"]["adversarial_steps"] > 0
    assert without_times(two) == without_times(one)
    for part in ("bank", "learner", "inversion"):
        a, b = (checkpointed_state(o / "checkpoints" / f"checkpoint_{ITERATIONS}", part) for o in (one, two))
        assert identical(a, b), part

    resumed = tmp_path / "resumed"  # the one-process run as if killed after its checkpoint at iteration 8
    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"checkpoint_{ITERATIONS}")
    for name in ("results.json", "metatest_rows.json"):
        (resumed / name).unlink(missing_ok=True)
    res = recipe(args(resumed) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert without_times(resumed)["rows"] == without_times(one)["rows"]

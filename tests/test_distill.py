"""meta.init=distilled: the zoo distilled into the meta-learner's network on the run's bank, then ECI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from meta_synthetic import ARCH_ARGS, template_images, tiny_teacher
from purer.inversion import EpisodeInversion, InversionConfig, PseudoBank
from purer.distill import distill_zoo, distillation_loss, teacher_agreement
from purer.meta import batch_stats_only, random_model, with_new_head
from recipe_runs import accuracies, overrides, recipe


@pytest.fixture(scope="module")
def zoo():
    """Four 8 px teachers on disjoint 3-class blocks."""
    data = template_images(num_classes=12)
    return [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i) for i in range(4)]


def distilled(zoo, steps: int):
    bank = PseudoBank(zoo, images_per_class=4)
    inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=2))
    return distill_zoo(zoo, bank, inversion, "conv4", steps, seed=0, arch_args=ARCH_ARGS), bank, inversion


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
        distill_zoo(zoo, bank, inversion, "conv4", 0, seed=0)
    with pytest.raises(ValueError, match="given bank"):
        distill_zoo(zoo, PseudoBank(zoo, images_per_class=2), inversion, "conv4", 1, seed=0)


def test_a_new_head_keeps_the_encoder_and_is_seeded(zoo):
    student = distilled(zoo, 2)[0]
    model = with_new_head(student, 5, seed=1)
    assert model.head.out_features == 5 and student.head.out_features == 12
    assert all(torch.equal(p, q) for p, q in zip(model.encoder.parameters(), student.encoder.parameters()))
    assert torch.equal(model.head.weight, with_new_head(student, 5, seed=1).head.weight)
    assert all(p.requires_grad for p in model.parameters())


def test_a_distilled_run_completes_and_resumes_without_distilling_again(tiny_root, tmp_path):
    fast = {"meta.init": "distilled", "meta.distill_steps": 5, "eval.baselines": "[]", "eval.icfil": "false"}
    out = tmp_path / "distilled"
    res = recipe(overrides(tiny_root, out, 4, **fast))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["meta_train"]["seconds_distill"] > 0
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint_2", resumed / "checkpoints" / "checkpoint_2")
    res = recipe(overrides(tiny_root, resumed, 4, **fast) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["meta_train"]["seconds_distill"] == 0
    assert accuracies(resumed) == accuracies(out)

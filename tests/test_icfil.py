import dataclasses

import pytest
import torch
import torch.nn.functional as F

from purer.calibrate import (ICFIL, CalibratedLearner, ICFILConfig, NoCalibration, SupervisedContrastiveLoss,
                             SupportCE, SupportCEConfig, adapted_model, calibrator, frozen_teacher,
                             select_calibration, supervised_contrastive_loss)
from purer.data import EpisodeSampler, ImageSet
from purer.evaluate import evaluate, task_list
from purer.inversion.synthesizer import InversionConfig
from purer.meta import ANIL, MAML, InputSpec, MAMLConfig, ProtoNet, random_model
from purer.meta.base import MetaLearner

SIZE = 16
ARCH_ARGS = {"width": 8, "depth": 3}  # 16 -> 2x2x8 = 32 features
FAST = ICFILConfig(pseudo_per_class=3, inversion_steps=8, calibration_steps=3,
                   inversion=InversionConfig(teachers_per_step=1, lr=0.1))


def blob_images(num_classes: int, per_class: int = 8, seed: int = 0) -> ImageSet:
    """Each class: a random 4x4 binary template upsampled to 16x16, jittered by +-1 px, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, 1, 4, 4, generator=g).round(), size=(SIZE, SIZE))
    x = templates.repeat_interleave(per_class, 0)
    shifts = torch.randint(-1, 2, (len(x), 2), generator=g)
    x = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(x, shifts)])
    x = (0.8 * x + 0.1 + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return ImageSet(x, labels, [f"c{i}" for i in range(num_classes)])



@pytest.fixture(scope="module")
def trained_model():
    """A small Conv4 trained for a few seconds on 10 classes disjoint from the test classes."""
    torch.manual_seed(0)
    data = blob_images(10, seed=1)
    model = random_model("conv4", 10, 1, SIZE, ARCH_ARGS, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data.float_images(), data.labels
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def test_set():
    return blob_images(8, seed=2)


def episode(data, shot=1, seed=0):
    return data.episode(EpisodeSampler(data.class_sizes(), 5, shot, 4, seed=seed).task(0))


def learners(model):
    encoder = random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0)
    encoder.encoder = model.encoder
    spec = InputSpec(1, SIZE, (0.5,), (0.25,))
    return {"maml": MAML(encoder, 5, spec, MAMLConfig(inner_lr=0.1, inner_steps=2)),
            "anil": ANIL(encoder, 5, None, MAMLConfig(inner_lr=0.5, inner_steps=3)),
            "protonet": ProtoNet(model)}


# --- the supervised contrastive loss -------------------------------------------------------------------------------

def reference_supcon(f, y, t):
    """Loop form of the loss, straight from its definition."""
    z = F.normalize(f, dim=1)
    terms = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in range(len(z)) if a != i]), 0)
        terms.append(torch.stack([denom - z[i] @ z[p] / t for p in pos]).mean())
    return torch.stack(terms).mean()


def test_supcon_matches_its_definition():
    torch.manual_seed(0)
    f = torch.randn(9, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])  # labels 2 and 4 are singletons: no anchor terms
    for t in (0.07, 0.5):
        assert torch.allclose(supervised_contrastive_loss(f, y, t), reference_supcon(f, y, t), atol=1e-5)
    assert torch.allclose(SupervisedContrastiveLoss(0.5)(f, y), reference_supcon(f, y, 0.5), atol=1e-5)


def test_supcon_lower_when_real_and_pseudo_of_a_label_coincide():
    real = torch.eye(3, 8) * 2  # one real feature per label, orthogonal
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    coincide = torch.cat([real, real + 0.01 * torch.randn(3, 8)])
    apart = torch.cat([real, real.roll(1, dims=0)])  # pseudo of label c sits on real of label c-1
    assert supervised_contrastive_loss(coincide, labels) < 0.1
    assert supervised_contrastive_loss(coincide, labels) < supervised_contrastive_loss(apart, labels) - 1


def test_supcon_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0)
    x, y = torch.rand(6, 1, SIZE, SIZE), torch.tensor([0, 0, 1, 1, 2, 2])
    supervised_contrastive_loss(model.features(x), y).backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_supcon_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        supervised_contrastive_loss(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="labels must be"):
        supervised_contrastive_loss(torch.rand(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive_loss(torch.rand(4, 2), torch.zeros(4), temperature=0)
    with pytest.raises(ValueError, match="no positive pair"):
        supervised_contrastive_loss(torch.rand(3, 2), torch.arange(3))


# --- the ICFIL stage --------------------------------------------------------------------------------------------------

def test_config_checks_and_nests_the_inversion_config():
    with pytest.raises(ValueError, match="pseudo_per_class"):
        ICFILConfig(pseudo_per_class=0)
    with pytest.raises(ValueError, match="temperature"):
        ICFILConfig(temperature=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        ICFILConfig(pseudo_ce_weight=-1.0)
    assert isinstance(ICFILConfig().inversion, InversionConfig)


@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
def test_without_inversion_and_calibration_icfil_is_the_plain_learner(trained_model, test_set, kind):
    learner = learners(trained_model)[kind].eval()
    ep = episode(test_set, shot=2)
    off = ICFIL(dataclasses.replace(FAST, inversion_steps=0, calibration_steps=0))
    plain = learner.predict(learner.adapt(ep.support_x, ep.support_y, 5), ep.query_x)
    assert torch.allclose(off.predict(learner, ep.support_x, ep.support_y, 5, ep.query_x), plain, atol=1e-4)


def test_the_frozen_teacher_reproduces_the_adapted_model_on_the_support(trained_model, test_set):
    learner = learners(trained_model)["maml"].eval()
    ep = episode(test_set, shot=2)
    model, _ = adapted_model(learner, learner.adapt(ep.support_x, ep.support_y, 5))
    teacher = frozen_teacher(model, learner, ep.support_x)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        # eval mode with the support's statistics == batch statistics on the support itself
        assert torch.allclose(teacher(ep.support_x), model(learner.prepare(ep.support_x)), atol=1e-4)
        # ... but not on another batch, which batch statistics would normalise differently
        assert not torch.allclose(teacher(ep.query_x), model(learner.prepare(ep.query_x)), atol=1e-3)


@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
def test_calibration_never_touches_the_meta_learner_and_tasks_do_not_leak(trained_model, test_set, kind):
    learner = learners(trained_model)[kind].eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    icfil = ICFIL(FAST)
    a, b = episode(test_set, seed=0), episode(test_set, seed=1)
    alone = icfil.predict(learner, b.support_x, b.support_y, 5, b.query_x)
    icfil.predict(learner, a.support_x, a.support_y, 5, a.query_x)
    after_a = icfil.predict(learner, b.support_x, b.support_y, 5, b.query_x)
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in learner.parameters())
    assert torch.equal(alone, after_a)


@pytest.mark.parametrize("kind", ["maml", "protonet"])
def test_calibration_changes_the_task_model(trained_model, test_set, kind):
    learner = learners(trained_model)[kind].eval()
    ep = episode(test_set)
    off = ICFIL(dataclasses.replace(FAST, calibration_steps=0)).predict(learner, ep.support_x, ep.support_y, 5,
                                                                         ep.query_x)
    on = ICFIL(FAST).predict(learner, ep.support_x, ep.support_y, 5, ep.query_x)
    assert not torch.allclose(on, off, atol=1e-4)


def test_inverted_pseudo_support_is_recognised_by_the_adapted_model(trained_model, test_set):
    learner = learners(trained_model)["maml"].eval()
    ep = episode(test_set)
    cfg = dataclasses.replace(FAST, pseudo_per_class=4, inversion_steps=40, calibration_steps=0,
                              inversion=InversionConfig(teachers_per_step=1, lr=0.1, augment=False))
    task = ICFIL(cfg).adapt(learner, ep.support_x, ep.support_y, 5)
    noise = ICFIL(dataclasses.replace(cfg, inversion_steps=0)).adapt(learner, ep.support_x, ep.support_y, 5)
    assert task.pseudo_x.shape == (20, 1, SIZE, SIZE) and task.pseudo_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [
        3] * 4 + [4] * 4
    assert 0 <= task.pseudo_x.min() and task.pseudo_x.max() <= 1
    assert task.stats["inversion_acc"] >= 0.8 > 0.2  # chance is 1/5
    assert task.stats["inversion_acc"] > noise.stats["inversion_acc"]
    assert task.stats["r_bn"] < noise.stats["r_bn"]  # pulled towards the real support's statistics


@pytest.mark.parametrize("arch", ["conv4", "resnet10", "resnet18", "tv:mobilenet_v3_small"])
def test_a_task_runs_with_icfil_for_every_architecture(arch):
    torch.manual_seed(0)
    args = None if arch.startswith("tv:") else {"width": 8}
    learner = MAML(random_model(arch, 5, 1, SIZE, args, seed=0), 5).eval()
    ep = episode(blob_images(6, seed=3))
    cfg = dataclasses.replace(FAST, inversion_steps=2, calibration_steps=2)
    logits = ICFIL(cfg).predict(learner, ep.support_x, ep.support_y, 5, ep.query_x)
    assert logits.shape == (20, 5) and torch.isfinite(logits).all()


def test_wrapped_learner_fits_the_evaluation_and_passes_test_time_settings(trained_model, test_set):
    learner = learners(trained_model)["maml"]
    wrapped = ICFIL(FAST).wrap(learner)
    assert isinstance(wrapped, MetaLearner) and wrapped.tunable == learner.tunable
    tasks = task_list(test_set, 5, 1, query=4, tasks=3, seed=0)
    result = evaluate(wrapped, test_set, tasks, method="maml+icfil", adapt_kwargs={"steps": 1}, progress=False)
    assert result.task_acc.shape == (3,) and result.settings == {"steps": 1}
    assert result.test_cost["icfil_steps"] == FAST.inversion_steps + FAST.calibration_steps
    assert learner.training  # evaluate restores the mode of the wrapped learner
    with pytest.raises(ValueError, match="meta-test stage"):
        wrapped.outer_loss(episode(test_set))


def test_unknown_learner_is_a_clear_error():
    class Centroids(MetaLearner):
        def adapt(self, support_x, support_y, way, *, create_graph=False):
            return support_x

        def predict(self, adapted, x):
            return x.flatten(1)

    with pytest.raises(TypeError, match="MAML, ANIL and ProtoNet"):
        adapted_model(Centroids(), torch.zeros(1))


def test_select_calibration_searches_the_grid_on_validation_tasks(trained_model, test_set):
    learner = learners(trained_model)["protonet"]
    tasks = task_list(test_set, 5, 1, query=4, tasks=2, seed=0)
    best, acc, table = select_calibration(ICFIL(FAST), {"calibration_steps": [0, 2], "inversion.lr": [0.1]}, learner,
                                          test_set, tasks)
    c = best.config
    assert c.calibration_steps in (0, 2) and c.inversion.lr == 0.1 and c.pseudo_per_class == 3
    assert len(table) == 2 and acc == max(r["accuracy"] for r in table)
    with pytest.raises(ValueError, match="unknown ICFILConfig setting 'calibration_stepz'"):
        select_calibration(ICFIL(FAST), {"calibration_stepz": [1]}, learner, test_set, tasks)
    with pytest.raises(ValueError, match="unknown ICFILConfig setting 'inversion.lrr'"):
        select_calibration(ICFIL(FAST), {"inversion.lrr": [1]}, learner, test_set, tasks)
    best, _, table = select_calibration(SupportCE(), {"lr": [1e-4, 1e-3]}, learner, test_set, tasks)
    assert isinstance(best, SupportCE) and best.config.lr in (1e-4, 1e-3) and len(table) == 2


def test_the_support_ce_control_synthesises_nothing_and_fine_tunes_on_the_real_support(trained_model, test_set):
    learner = learners(trained_model)["maml"].eval()
    ep = episode(test_set)
    control = calibrator("support-ce", FAST)
    assert isinstance(control, SupportCE) and not isinstance(control, ICFIL)
    assert control.config == SupportCEConfig(steps=FAST.calibration_steps, lr=FAST.calibration_lr)
    task = control.adapt(learner, ep.support_x, ep.support_y, 5)
    assert len(task.pseudo_x) == 0 and control.wrap(learner).test_cost()["calibration_steps"] == 3
    assert "pseudo_per_class" not in control.wrap(learner).test_cost()
    # the same steps by hand: adapt, then Adam on cross-entropy over the real support
    adapted = learner.adapt(ep.support_x, ep.support_y, 5)
    model, _ = adapted_model(learner, adapted)
    opt = torch.optim.Adam(model.parameters(), lr=FAST.calibration_lr)
    for _ in range(FAST.calibration_steps):
        opt.zero_grad()
        F.cross_entropy(model(learner.prepare(ep.support_x)), ep.support_y).backward()
        opt.step()
    with torch.no_grad():
        expected = model(learner.prepare(ep.query_x))
        assert torch.allclose(task(ep.query_x), expected, atol=1e-5)


def test_the_calibrations_are_one_family(trained_model, test_set):
    learner = learners(trained_model)["maml"].eval()
    ep = episode(test_set)
    assert isinstance(calibrator("none"), NoCalibration) and calibrator("none").wrap(learner) is learner
    plain = learner.predict(learner.adapt(ep.support_x, ep.support_y, 5), ep.query_x)
    assert torch.equal(calibrator("none").predict(learner, ep.support_x, ep.support_y, 5, ep.query_x), plain)
    for name in ("icfil", "support-ce"):
        cal = calibrator(name, FAST)
        assert cal.name == name and isinstance(cal.wrap(learner), CalibratedLearner)
        assert cal.predict(learner, ep.support_x, ep.support_y, 5, ep.query_x).shape == (20, 5)
    with pytest.raises(ValueError, match="unknown calibration 'icfl'"):
        calibrator("icfl")


@pytest.mark.parametrize("kind,batching", [("maml", "loop"), ("anil", "loop"), ("protonet", "loop"),
                                           ("maml", "vmap")])
def test_the_rows_share_one_adaptation_and_equal_the_rows_computed_apart(trained_model, test_set, kind, batching,
                                                                         monkeypatch):
    """calibration_accuracies adapts the learner once per task for every row (plain, ICFIL, support CE, a grid's
    candidates) and gives, task by task and bit for bit, what each row evaluated on its own gives.  With tasks
    adapted together (vmap, a GPU's default) the plain row keeps that batched path and the calibrations share
    one adaptation per task among themselves."""
    from purer.calibrate import calibration_accuracies
    from purer.evaluate import task_accuracies

    learner = learners(trained_model)[kind]
    learner.task_batching = batching
    tasks = task_list(test_set, 5, 1, query=4, tasks=4, seed=0)
    cals = [calibrator("none"), ICFIL(FAST), SupportCE(SupportCEConfig(steps=2, lr=1e-3)),
            SupportCE(SupportCEConfig(steps=2, lr=1e-2))]
    kwargs = {"steps": 2} if "steps" in learner.tunable else {}
    apart = torch.stack([task_accuracies(c.wrap(learner), test_set, tasks, adapt_kwargs=kwargs, chunk=3)
                         for c in cals])
    calls = []
    adapt_task = type(learner).adapt_task
    monkeypatch.setattr(type(learner), "adapt_task", lambda self, *a, **k: calls.append(1) or adapt_task(self, *a, **k))
    shared, seconds = calibration_accuracies(learner, cals, test_set, tasks, adapt_kwargs=kwargs, chunk=3)
    assert torch.equal(shared, apart) and len(calls) == len(tasks)  # the calibrations' one adaptation per task
    assert len(seconds) == len(cals) and min(seconds) > 0
    assert learner.training  # the learner's mode is restored


def test_the_meta_test_rows_take_one_inner_loop_per_task(trained_model, test_set, monkeypatch):
    """The pipeline's meta-test: the plain, ICFIL, support-CE and SimpleShot rows of a shot adapt the learner once
    per test task between them (plus the meta-val selection's passes; SimpleShot's alone makes none), and give
    the rows each one gives apart."""
    from purer.pipeline import RunConfig, evaluate_purer
    from purer.pipeline.distributed import Dist
    from purer.yaml_config import load_config

    learner = learners(trained_model)["maml"]
    cfg = load_config(RunConfig, None, ["eval.shots=[1]", "eval.tasks=5", "eval.val_tasks=2", "eval.query=4",
                                        "eval.grid.lr=[0.1]", "eval.grid.steps=[1, 2]", "icfil.inversion_steps=2",
                                        "icfil.calibration_steps=2", "eval.baselines=[]"])
    counted = []
    adapt = MAML.adapt
    monkeypatch.setattr(MAML, "adapt", lambda self, *a, **k: counted.append(len(a[0])) or adapt(self, *a, **k))
    rows, chosen = evaluate_purer(cfg, learner, {"val": test_set, "test": test_set}, Dist(), progress=False)
    # meta-val: 2 grid points x 2 tasks, then one pass per calibration that adapts (2 tasks each); meta-test: 5
    # tasks, once
    assert len(counted) == 2 * 2 + 2 * 2 + 5
    tasks = task_list(test_set, 5, 1, 4, 5, cfg.eval.seed)
    settings = rows[0]["settings"]
    names = ("none", "icfil", "support-ce", "simpleshot")
    for row, cal in zip(rows, [calibrator(n, cfg.icfil) for n in names], strict=True):
        apart = evaluate(cal.wrap(learner), test_set, tasks, adapt_kwargs=settings, progress=False)
        assert row["accuracy"] == round(apart.accuracy, 2) and row["ci95"] == round(apart.ci95, 2)
    assert [r["method"] for r in rows] == ["purer", "purer+icfil", "purer+support-ce", "purer+simpleshot"]
    assert "paired_vs_purer" in rows[1] and chosen[1]["name"] in names

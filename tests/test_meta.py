import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from meta_synthetic import ARCH_ARGS, SIZE, assert_together_equals_one_by_one, template_images, tiny_teacher
from purer.data import Episode, EpisodeSampler
from purer.baselines import teacher_scores
from purer.evaluate import evaluate, task_list
from purer.pipeline import RunConfig, RunError, best_start_teacher, build_learner
from purer.pipeline.run_config import EvalConfig, MetaConfig
from purer.meta import (ANIL, MAML, InputSpec, MAMLConfig, MetaTrainConfig, ProtoNet, average_teachers, from_model,
                        WeightAverage, meta_step, meta_train, random_model, real_episodes, set_outer_lr)
from purer.zoo import Teacher, build_model


def tiny_model(way=5, seed=0):
    return random_model("conv4", way, 1, SIZE, ARCH_ARGS, seed=seed)


def an_episode(way=5, shot=2, query=3, seed=0):
    data = template_images(num_classes=way + 2, seed=seed)
    return data.episode(EpisodeSampler(data.class_sizes(), way, shot, query, seed=seed).task(0))


def test_adapt_shapes_and_own_weights_unchanged():
    torch.manual_seed(0)
    learner = MAML(tiny_model(), 5, InputSpec(1, SIZE, (0.5,), (0.25,)), MAMLConfig(inner_lr=0.1, inner_steps=3))
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = an_episode()
    fast = learner.adapt(ep.support_x, ep.support_y, 5)
    assert set(fast) == {n for n, _ in learner.model.named_parameters()}
    assert learner.predict(fast, ep.query_x).shape == (15, 5)
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    assert not any(v.requires_grad for v in fast.values())  # no graph kept without create_graph


def test_batch_norm_uses_batch_statistics_only():
    learner = MAML(tiny_model(), 5)
    bns = [m for m in learner.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None and not m.track_running_stats for m in bns)
    x = torch.rand(6, 1, SIZE, SIZE)
    fast = dict(learner.model.named_parameters())
    learner.eval()
    eval_out = learner.predict(fast, x)
    learner.train()
    assert torch.allclose(eval_out, learner.predict(fast, x))


def test_wrong_way_is_a_clear_error():
    with pytest.raises(ValueError, match="from_model"):
        MAML(tiny_model(way=3), 5)
    learner = MAML(tiny_model(), 5)
    with pytest.raises(ValueError, match="5-way"):
        learner.adapt(torch.rand(3, 1, SIZE, SIZE), torch.arange(3), 3)


def test_maml_adaptation_and_meta_training_improve_query_accuracy():
    torch.manual_seed(0)
    train, test = template_images(20, seed=1), template_images(12, seed=2)
    learner = MAML(tiny_model(), 5, config=MAMLConfig(inner_lr=0.05, inner_steps=1))
    tasks = task_list(test, 5, 1, query=5, tasks=30, seed=3)
    unadapted = evaluate(learner, test, tasks, adapt_kwargs={"steps": 0}, progress=False).accuracy
    adapted_before = evaluate(learner, test, tasks, progress=False).accuracy
    history = meta_train(learner, real_episodes(train, 5, 1, query=5, seed=4),
                         MetaTrainConfig(iterations=40, meta_batch=2, outer_lr=3e-3), progress=False)
    adapted_after = evaluate(learner, test, tasks, progress=False).accuracy
    assert len(history.acc) == 40
    assert unadapted < 35 and adapted_before > unadapted + 15
    assert adapted_after > adapted_before + 15


def outer_grads(learner, ep):
    learner.zero_grad()
    loss, _ = learner.outer_loss(ep)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.parameters()]), loss.item()


def test_second_order_matches_finite_differences_and_differs_from_first_order():
    torch.manual_seed(0)
    model = random_model("conv4", 3, 1, 4, {"width": 2, "depth": 1}, seed=0).double()
    cfg = MAMLConfig(inner_lr=0.5, inner_steps=2)
    second = MAML(model, 3, config=cfg)
    first = MAML(model, 3, config=MAMLConfig(inner_lr=0.5, inner_steps=2, first_order=True))
    g = torch.Generator().manual_seed(1)
    ep = Episode(torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat_interleave(2),
                 torch.rand(9, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat_interleave(3))
    g2, _ = outer_grads(second, ep)
    g1, _ = outer_grads(first, ep)
    assert not torch.allclose(g1, g2, rtol=1e-3, atol=1e-6)

    params = list(second.parameters())
    eps = 1e-6
    for trial in range(3):
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        with torch.no_grad():
            losses = []
            for sign in (1, -1):
                for p, d in zip(params, v):
                    p.add_(sign * eps * d)
                losses.append(second.outer_loss(ep)[0].item())
                for p, d in zip(params, v):
                    p.sub_(sign * eps * d)
        # outer_loss under no_grad must still adapt (the inner loop enables grad itself)
        fd = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(g2 @ torch.cat([d.flatten() for d in v]))
        assert fd == pytest.approx(analytic, rel=1e-4, abs=1e-8)
        assert abs(fd - float(g1 @ torch.cat([d.flatten() for d in v]))) > 1e-5


def test_anil_adapts_only_the_head():
    torch.manual_seed(0)
    learner = ANIL(tiny_model(), 5, config=MAMLConfig(inner_lr=0.3, inner_steps=1))
    ep = an_episode()
    head = learner.adapt(ep.support_x, ep.support_y, 5)
    assert set(head) == {"weight", "bias"}
    feats = learner.model.encoder(ep.support_x)
    w, b = learner.model.head.weight, learner.model.head.bias
    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(feats, w, b), ep.support_y), (w, b))
    assert torch.allclose(head["weight"], w - 0.3 * gw, atol=1e-6)
    assert torch.allclose(head["bias"], b - 0.3 * gb, atol=1e-6)
    # the encoder is shared: ANIL's prediction = MAML's with unchanged encoder weights and the adapted head
    maml = MAML(learner.model, 5)
    fast = {n: p for n, p in learner.model.named_parameters()}
    fast["head.weight"], fast["head.bias"] = head["weight"], head["bias"]
    assert torch.allclose(learner.predict(head, ep.query_x), maml.predict(fast, ep.query_x), atol=1e-5)
    learner.zero_grad()
    learner.outer_loss(ep)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.model.encoder.parameters()
               if p.ndim > 1)


def test_protonet_reaches_near_perfect_accuracy_on_separable_data():
    torch.manual_seed(0)
    train, test = template_images(20, seed=1, noise=0.1), template_images(12, seed=2, noise=0.1)
    learner = ProtoNet(tiny_model())
    meta_train(learner, real_episodes(train, 5, 1, query=5, seed=0), MetaTrainConfig(iterations=30, meta_batch=2),
               progress=False)
    result = evaluate(learner, test, task_list(test, 5, 1, query=5, tasks=40, seed=1), progress=False)
    assert result.accuracy > 97


def test_protonet_logits_are_negative_squared_distances():
    learner = ProtoNet(tiny_model())
    ep = an_episode(shot=3)
    protos = learner.adapt(ep.support_x, ep.support_y, 5)
    f_s, f_q = learner.features(ep.support_x), learner.features(ep.query_x)
    assert torch.allclose(protos[2], f_s[ep.support_y == 2].mean(0), atol=1e-5)
    assert torch.allclose(learner.predict(protos, ep.query_x), -torch.cdist(f_q, protos) ** 2, atol=1e-3)


@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
def test_outer_loss_gradient_reaches_support_and_query_images(kind):
    torch.manual_seed(0)
    learner = {"maml": lambda: MAML(tiny_model(), 5), "anil": lambda: ANIL(tiny_model(), 5),
               "protonet": lambda: ProtoNet(tiny_model())}[kind]()
    learner.eval()  # the curriculum may call it in eval mode: grad mode alone decides
    ep = an_episode()
    ep.support_x.requires_grad_(True)
    ep.query_x.requires_grad_(True)
    loss, acc = learner.outer_loss(ep)
    loss.backward()
    assert 0 <= float(acc) <= 1 and not acc.requires_grad
    assert ep.support_x.grad.abs().sum() > 0 and ep.query_x.grad.abs().sum() > 0


def test_meta_step_averages_the_meta_batch_and_reports_accuracy():
    torch.manual_seed(0)
    eps = [an_episode(seed=s) for s in range(3)]
    a, b = ProtoNet(tiny_model()), ProtoNet(tiny_model())
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    loss, acc = meta_step(a, opt, eps)
    parts = [b.outer_loss(e) for e in eps]
    assert loss == pytest.approx(sum(float(l.detach()) for l, _ in parts) / 3, rel=1e-5)
    assert acc == pytest.approx(sum(float(c) for _, c in parts) / 3)
    torch.stack([l for l, _ in parts]).mean().backward()
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa, pb - 0.1 * pb.grad, atol=1e-6)


def test_a_meta_step_split_over_processes_is_bit_for_bit_the_whole_step():
    """Two simulated processes take tasks 0, 2 and 1, 3; their rows are summed in task order, as one
    process accumulates them, so the weights agree exactly (not merely to rounding: Adam turns the
    rounding noise of a convolution bias before BatchNorm, whose gradient is zero in exact
    arithmetic, into full-size steps)."""
    eps = [an_episode(seed=s) for s in range(4)]

    def fresh():
        learner = MAML(tiny_model(), 5)
        return learner, torch.optim.Adam(learner.parameters(), lr=1e-3)

    whole, opt = fresh()
    whole_stats = meta_step(whole, opt, eps)
    theirs, opt_theirs = fresh()
    rows: dict[int, torch.Tensor] = {}
    meta_step(theirs, opt_theirs, eps[1::2], total=4, sync=lambda r: rows.update(zip((1, 3), r)) or r * 2)  # records
    mine, opt_mine = fresh()
    stats = meta_step(mine, opt_mine, eps[0::2], total=4,
                      sync=lambda r: [v for _, v in sorted({**rows, **dict(zip((0, 2), r))}.items())])
    assert stats == whole_stats
    assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), whole.parameters()))


def test_meta_train_callback_validation_and_best_state():
    torch.manual_seed(0)
    train, val = template_images(20, seed=1), template_images(10, seed=2)
    learner = ProtoNet(tiny_model())
    seen = []
    calls = iter(range(10 ** 6))
    source = real_episodes(train, 5, 1, query=3, seed=0)
    history = meta_train(learner, lambda: (next(calls), next(source))[1],
                         MetaTrainConfig(iterations=6, meta_batch=2, val_every=3),
                         val=(val, task_list(val, 5, 1, query=3, tasks=5)),
                         callback=lambda step, loss, acc: seen.append(step), progress=False)
    assert seen == list(range(1, 7)) and len(history.loss) == 6 and next(calls) == 12
    assert [s for s, _ in history.val] == [3, 6] and history.best_step in (3, 6)
    final = evaluate(learner, val, task_list(val, 5, 1, query=3, tasks=5), progress=False).accuracy
    assert final == pytest.approx(history.best_val)
    with pytest.raises(ValueError, match="val="):
        meta_train(learner, source, MetaTrainConfig(iterations=1, val_every=1), progress=False)


def test_meta_train_stops_once_meta_val_sets_no_new_best_in_patience_scores(monkeypatch):
    import purer.meta.train as train_module

    scores = iter([50.0, 60.0, 55.0, 58.0, 90.0, 95.0])  # the best at step 2, then two scores below it
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: type("R", (), {"accuracy": next(scores)})())
    torch.manual_seed(0)
    learner = ProtoNet(tiny_model())
    weights = []
    history = meta_train(learner, real_episodes(template_images(20, seed=1), 5, 1, query=3, seed=0),
                         MetaTrainConfig(iterations=6, meta_batch=1, val_every=1, patience=2),
                         val=(None, []), progress=False,
                         callback=lambda step, loss, acc: weights.append(
                             {k: v.clone() for k, v in learner.state_dict().items()}))
    assert len(history.loss) == 4 and [s for s, _ in history.val] == [1, 2, 3, 4] and history.best_step == 2
    assert all(torch.equal(v, weights[1][k]) for k, v in learner.state_dict().items())  # step 2's weights kept
    config = MetaTrainConfig(val_every=1, patience=2)
    assert not config.converged([]) and not config.converged([(1, 5.0), (2, 6.0), (3, 4.0)])
    assert config.converged([(1, 5.0), (2, 6.0), (3, 4.0), (4, 4.0)])
    assert config.converged([(1, 5.0), (2, 6.0), (3, 6.0), (4, 4.0)])  # an equal score is no new best
    assert not MetaTrainConfig(val_every=1).converged([(1, 5.0), (2, 4.0), (3, 4.0)])  # patience 0: never
    # A pre-trained start's score (step 0) does not count: the dip below it that training starts with (the
    # runs' own meta-val on random100: 73.0, then 68.2, 72.8) must not end the run.
    assert not config.converged([(0, 73.0), (250, 68.2), (500, 72.8)])
    assert not config.converged([(0, 73.0), (250, 68.2), (500, 72.8), (750, 70.0)])
    assert config.converged([(0, 73.0), (250, 68.2), (500, 72.8), (750, 70.0), (1000, 71.0)])
    with pytest.raises(ValueError, match="patience"):
        MetaTrainConfig(patience=-1)


def test_average_teachers_is_the_elementwise_mean():
    data = template_images(15)
    teachers = [tiny_teacher(data, list(range(5 * i, 5 * i + 5)), seed=i, steps=3) for i in range(3)]
    avg = average_teachers(teachers, way=5)
    for name, p in avg.named_parameters():
        expected = torch.stack([dict(t.model.named_parameters())[name] for t in teachers]).mean(0)
        assert torch.allclose(p, expected, atol=1e-6), name
        assert p.requires_grad
    fresh = average_teachers(teachers, way=4)
    assert fresh.head.out_features == 4
    assert torch.allclose(fresh.encoder[0][0].weight, avg.encoder[0][0].weight)
    other = tiny_teacher(data, [0, 1, 2, 3, 4], seed=0, steps=1)
    other.config.image_size = 16
    with pytest.raises(ValueError, match="different architectures"):
        average_teachers(teachers + [other], way=5)


def test_best_teacher_init_starts_from_the_meta_val_best_teacher_the_learner_can_be():
    data = template_images(15)
    val = data.subset(list(range(10, 15)))
    tasks = {"val": task_list(val, 3, 1, 2, 20, seed=0)}
    trained = [tiny_teacher(data, list(range(5 * i, 5 * i + 5)), seed=i) for i in range(2)]
    blind = tiny_teacher(data, [0, 1, 2, 3, 4], seed=5, steps=0)
    with torch.no_grad():
        blind.model.encoder[0][0].weight.zero_()  # the same features for every image: chance on meta-val
    wider = Teacher(build_model("conv4", 5, 1, SIZE, {"width": 16, "depth": 2}),  # not the learner's network
                    dataclasses.replace(trained[0].config, arch_args={"width": 16, "depth": 2}), "wider")
    zoo = [blind, wider, *trained]
    cfg = RunConfig(meta=MetaConfig(learner="maml", init="best-teacher", arch="conv4", arch_args=dict(ARCH_ARGS),
                                    way=3), eval=EvalConfig(way=3))
    best, score = best_start_teacher(cfg.meta, zoo, {"val": val}, tasks, 1, SIZE)
    candidates = [blind, *trained]
    scores = teacher_scores(candidates, val, tasks["val"])
    assert score == max(scores) and best is candidates[scores.index(score)]
    assert best is not blind and scores[0] < max(scores)
    learner = build_learner(cfg, zoo, 1, SIZE, best)
    encoder = dict(learner.model.encoder.named_parameters())
    assert all(torch.equal(p, encoder[n]) for n, p in best.model.encoder.named_parameters())
    assert learner.model.head.out_features == 3 and learner.input_spec == InputSpec.of(best.config)
    # the learner's network whatever arguments spell it (32 is Conv4's default width)
    default_width = Teacher(build_model("conv4", 5, 1, SIZE, {"depth": 2}),
                            dataclasses.replace(trained[0].config, arch_args={"depth": 2}), "default-width")
    wide = dataclasses.replace(cfg.meta, arch_args={"depth": 2, "width": 32})
    assert best_start_teacher(wide, zoo + [default_width], {"val": val}, tasks, 1, SIZE)[0] is default_width
    # no teacher is a ResNet-10, nor a Conv4 on colour images: no start (the run falls back to random init)
    resnet = dataclasses.replace(cfg.meta, arch="resnet10", arch_args={"width": 4})
    assert best_start_teacher(resnet, zoo, {"val": val}, tasks, 1, SIZE) is None
    assert best_start_teacher(cfg.meta, zoo, {"val": val}, tasks, 3, SIZE) is None


def test_mtl_from_the_best_teacher_refuses_a_zoo_without_its_network_in_one_line(tmp_path):
    """Random initialisation stands in for a missing start teacher, but not under MTL, which freezes its start."""
    from purer.pipeline import ECI
    from purer.pipeline.distributed import Dist
    from purer.yaml_config import load_config

    data = template_images(num_classes=6)
    zoo = [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i, steps=2) for i in range(2)]
    overrides = {"data.image_size": SIZE, "meta.learner": "mtl", "meta.init": "best-teacher", "meta.arch": "resnet10",
                 "meta.arch_args": "{width: 4}", "meta.way": 3, "meta.shot": 1, "meta.query": 2, "meta.val_tasks": 2,
                 "eval.way": 3, "eval.calibrations": "[]", "inversion.teachers_per_step": 2,
                 "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out")}
    cfg = load_config(RunConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(RunError, match=r"mtl freezes a pre-trained encoder and no teacher is a resnet10 .*the zoo has "
                                       r"conv4 1x8px\): set meta.arch to one of them, or meta.init=zoo-student"):
        ECI(cfg, zoo, {"val": template_images(num_classes=4, seed=1, name="val")}, Dist(device="cpu"))


def test_from_model_copies_and_replaces_a_mismatched_head():
    data = template_images(10)
    teacher = tiny_teacher(data, [0, 1, 2], steps=2)
    same = from_model(teacher, 3)
    assert torch.equal(same.head.weight, teacher.model.head.weight)
    assert same.head.weight is not teacher.model.head.weight
    assert all(p.requires_grad for p in same.parameters())
    assert from_model(teacher, 5).head.out_features == 5
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("arch,args,first_order", [
    ("conv4", ARCH_ARGS, False), ("resnet10", {"width": 4}, False), ("resnet18", {"width": 4}, True),
    ("tv:mobilenet_v3_small", {}, True)])
def test_maml_works_for_every_zoo_architecture(arch, args, first_order):
    torch.manual_seed(0)
    learner = MAML(random_model(arch, 5, 1, SIZE, args, seed=0), 5, InputSpec(1, SIZE),
                   MAMLConfig(inner_lr=0.1, inner_steps=2, first_order=first_order))
    assert not list(learner.model.buffers())  # no BatchNorm running statistics left
    ep = an_episode()
    loss, _ = learner.outer_loss(ep)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters())
    fast = learner.adapt(ep.support_x, ep.support_y, 5)
    assert learner.predict(fast, ep.query_x).shape == (15, 5)


@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
def test_a_saved_model_folder_reloads_to_the_same_predictions(kind, tmp_path):
    from purer.meta import MetaLearner

    spec = InputSpec(1, SIZE, (0.5,), (0.25,))
    model = tiny_model(seed=3)
    learner = ProtoNet(model, spec) if kind == "protonet" else \
        (ANIL if kind == "anil" else MAML)(model, 5, spec, MAMLConfig(inner_lr=0.2, inner_steps=2))
    chosen = {1: {"lr": 0.5, "steps": 10}, 5: {"lr": 0.1, "steps": 1}}
    learner.test_time = {1: {}, 5: {}} if kind == "protonet" else chosen  # nothing to tune in a ProtoNet
    learner.save_pretrained(tmp_path / "learner", selected={"iteration": 7})
    config = __import__("json").loads((tmp_path / "learner" / "config.json").read_text())
    assert config["learner"] == kind and config["in_channels"] == 1 and config["image_size"] == SIZE
    assert config["mean"] == [0.5] and config["std"] == [0.25] and config["selected"] == {"iteration": 7}
    loaded = MetaLearner.from_pretrained(tmp_path / "learner")
    assert type(loaded) is type(learner) and not loaded.training
    if kind != "protonet":
        assert config["test_time"] == {"1": {"lr": 0.5, "steps": 10}, "5": {"lr": 0.1, "steps": 1}}
        assert loaded.test_time_settings(1) == {"lr": 0.5, "steps": 10}
        assert loaded.test_time_settings(4) == {"lr": 0.1, "steps": 1}  # the nearest shot chosen for
        assert loaded.config == learner.config
    ep = an_episode()
    # A bigger image (grey, 2x the size) is resized by the saved input contract, as a user's would be.
    big = lambda x: torch.nn.functional.interpolate(x, scale_factor=2)
    for net in (learner.eval(), loaded):
        state = net.adapt(big(ep.support_x), ep.support_y, 5, **net.test_time_settings(1))
        if net is learner:
            expected = net.predict(state, big(ep.query_x))
        else:
            assert torch.allclose(net.predict(state, big(ep.query_x)), expected, atol=1e-6)


def test_a_model_folder_needs_a_registered_network_and_a_readable_folder(tmp_path):
    from purer.meta import MetaLearner

    hand_made = ProtoNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 4)))
    with pytest.raises(ValueError, match="hand-made network"):
        hand_made.save_pretrained(tmp_path / "hand")
    with pytest.raises(ValueError, match="cannot load a meta-learner from"):
        MetaLearner.from_pretrained(tmp_path / "missing")
    ProtoNet(tiny_model(), InputSpec(1, SIZE)).save_pretrained(tmp_path / "proto")
    with pytest.raises(ValueError, match="holds a ProtoNet, not a MAML"):
        MAML.from_pretrained(tmp_path / "proto")


def a_task_batch(tasks=3, way=5, shot=2, query=3, seed=0):
    from purer.data import TaskBatch
    data = template_images(num_classes=way + 4, seed=seed)
    sampler = EpisodeSampler(data.class_sizes(), way, shot, query, seed=seed)
    return TaskBatch.stack([data.episode(sampler.task(i)) for i in range(tasks)])


@pytest.mark.parametrize("kind,first_order", [("maml", False), ("maml", True), ("anil", False), ("protonet", False)])
def test_tasks_adapted_together_equal_tasks_adapted_one_by_one(kind, first_order):
    """vmap over tasks (each its own BatchNorm batch) gives the per-task logits and the same meta-gradient."""
    torch.manual_seed(0)
    spec = InputSpec(1, SIZE, (0.5,), (0.25,))
    model = random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=1).double()
    learner = ProtoNet(model, spec) if kind == "protonet" else \
        (ANIL if kind == "anil" else MAML)(model, 5, spec, MAMLConfig(inner_lr=0.3, inner_steps=2,
                                                                       first_order=first_order))
    batch = a_task_batch()
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    assert_together_equals_one_by_one(learner, batch)


def test_slow_vmap_operators_names_the_fallbacks_and_passes_other_warnings_on():
    import warnings

    import torch.nn.functional as F
    from torch.func import vmap

    from purer.meta import slow_vmap_operators

    def unpool(x):  # max_unpool2d has no batching rule: torch.func loops over the batch
        return F.max_unpool2d(x.view(1, 1, 2, 2), torch.tensor([[[[0, 1], [2, 3]]]]), 2)

    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with slow_vmap_operators() as slow:
            vmap(unpool)(torch.rand(3, 4))
            vmap(unpool)(torch.rand(3, 4))
            warnings.warn("not a fallback")
    assert slow == ["aten::max_unpool2d"]
    assert [str(w.message) for w in outside] == ["not a fallback"]
    with warnings.catch_warnings(record=True) as after:  # the warning is off again after the block
        warnings.simplefilter("always")
        vmap(unpool)(torch.rand(3, 4))
    assert not after
    weight = torch.rand(2, 1, 3, 3)
    with slow_vmap_operators() as slow:  # a convolution has its batching rule
        vmap(lambda x: F.conv2d(x, weight).relu().sum())(torch.rand(3, 1, 1, 6, 6))
    assert slow == []


@pytest.mark.parametrize("channels", [1, 3])
def test_a_cpu_learner_runs_its_network_channels_last_for_grey_and_colour_input(channels):
    """MetaLearner.prepare lays a CPU input out channels-last; for one channel that needs explicit strides
    (.contiguous(memory_format=...) leaves a grey image as it is, since it counts as channels-last already, and the
    convolution then runs the slow contiguous path: what the default glyph run did before)."""
    model = random_model("conv4", 5, channels, SIZE, ARCH_ARGS, seed=0)
    learner = MAML(model, 5, InputSpec(channels, SIZE, (0.5,) * channels, (0.25,) * channels))
    x = torch.rand(4, channels, SIZE, SIZE)
    z = learner.prepare(x)
    assert z.stride() == x.to(memory_format=torch.channels_last).stride()
    first_conv = model.encoder[0][0]
    out = first_conv(z)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    with torch.no_grad():  # the same numbers as the contiguous layout, up to float rounding
        assert torch.allclose(model(z), model(z.contiguous()), atol=1e-5)


def averaged_meta_train(config: MetaTrainConfig, val=None):
    """Meta-train a tiny MAML with ``config`` (its ``average`` on); returns the learner, its history, the weights
    after every step and the weight average the recurrence gives for them."""
    torch.manual_seed(0)
    learner = MAML(tiny_model(), 5, config=MAMLConfig(inner_lr=0.1))
    weights = [{k: v.clone() for k, v in learner.state_dict().items()}]
    history = meta_train(learner, real_episodes(template_images(20, seed=1), 5, 1, query=3, seed=0), config,
                         val=val, progress=False,
                         callback=lambda step, loss, acc: weights.append(
                             {k: v.clone() for k, v in learner.state_dict().items()}))
    expected = dict(weights[0])
    for n, w in enumerate(weights[1:], start=1):
        d = min(config.average, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    return learner, history, weights, expected


def test_weight_average_is_what_meta_val_scores_and_what_is_kept():
    val = template_images(10, seed=2)
    tasks = task_list(val, 5, 1, query=3, tasks=5)
    learner, history, weights, expected = averaged_meta_train(
        MetaTrainConfig(iterations=5, meta_batch=2, val_every=5, average=0.2), val=(val, tasks))
    kept = learner.state_dict()
    assert all(torch.allclose(kept[k], expected[k], atol=1e-6) for k in kept)
    assert not all(torch.allclose(kept[k], weights[-1][k]) for k in kept)  # the average, not the last weights
    assert evaluate(learner, val, tasks, progress=False).accuracy == pytest.approx(history.best_val)
    with pytest.raises(ValueError, match="average"):
        MetaTrainConfig(average=1.0)


def test_without_meta_val_the_final_weight_average_is_kept():
    learner, _, weights, expected = averaged_meta_train(MetaTrainConfig(iterations=3, meta_batch=2, average=0.2))
    kept = learner.state_dict()
    assert all(torch.allclose(kept[k], expected[k], atol=1e-6) for k in kept)
    assert not all(torch.allclose(kept[k], weights[-1][k]) for k in kept)


def test_weight_average_off_changes_nothing():
    learner = MAML(tiny_model(), 5)
    average = WeightAverage(learner, 0.0)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(1.0)
    average.update(learner, 1)
    with average.swapped_in(learner):
        assert all(torch.equal(v, before[k] + 1) for k, v in learner.state_dict().items())
    assert average.state_dict() == {}
    on = WeightAverage(learner, 0.9)
    with on.swapped_in(learner):
        with torch.no_grad():
            for p in learner.parameters():
                p.zero_()
    assert all(torch.equal(v, before[k] + 1) for k, v in learner.state_dict().items())  # own weights back
    with pytest.raises(KeyError, match="meta.train.average"):
        on.load_state_dict({})


def test_cosine_schedule_anneals_the_outer_lr_from_outer_lr_toward_zero():
    train = template_images(20, seed=1)
    learner = ProtoNet(tiny_model())
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.01)
    seen = []
    meta_train(learner, real_episodes(train, 5, 1, query=3, seed=0),
               MetaTrainConfig(iterations=4, meta_batch=1, schedule="cosine"), optimizer=optimizer, progress=False,
               callback=lambda step, loss, acc: seen.append(optimizer.param_groups[0]["lr"]))
    assert seen == pytest.approx([0.01, 0.01 * (1 + math.cos(math.pi / 4)) / 2, 0.005,
                                  0.01 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert optimizer.state_dict()["param_groups"][0]["initial_lr"] == 0.01  # checkpointed with the optimizer
    constant = torch.optim.Adam(learner.parameters(), lr=0.01)
    set_outer_lr(constant, MetaTrainConfig(iterations=4), 3)
    assert constant.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="schedule"):
        MetaTrainConfig(schedule="linear")

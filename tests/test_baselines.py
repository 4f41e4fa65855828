import pytest
import torch

from meta_synthetic import template_images, tiny_teacher
from purer.baselines import (METHODS, BaselineConfig, FineTune, NearestCentroid, best_teacher, run_baselines,
                             same_architecture)
from purer.evaluate import TuningGrid, evaluate, task_list
from purer.meta import MAMLConfig, MetaTrainConfig


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    train = template_images(15, seed=0, name="train")
    teachers = [tiny_teacher(train, list(range(5 * i, 5 * i + 5)), seed=i, steps=30) for i in range(3)]
    splits = {"train": train, "val": template_images(10, seed=1, name="val"),
              "test": template_images(10, seed=2, name="test")}
    return teachers, splits


def test_nearest_centroid_on_pixels_solves_separable_data(zoo):
    _, splits = zoo
    r = evaluate(NearestCentroid(), splits["test"], task_list(splits["test"], 5, 1, query=5, tasks=20),
                 progress=False)
    assert r.accuracy > 95 and r.test_cost == {"params": 0, "models": 0}


def test_concatenated_teacher_features_are_l2_normalised_per_teacher(zoo):
    teachers, splits = zoo
    nc = NearestCentroid(teachers)
    x = splits["test"].float_images(torch.arange(6))
    f = nc.features(x)
    dims = [t.model.feature_dim for t in teachers]
    assert f.shape == (6, sum(dims))
    for block in torch.split(f, dims, dim=1):
        assert torch.allclose(block.norm(dim=1), torch.ones(6), atol=1e-5)
    assert nc.test_cost() == {"params": sum(p.numel() for t in teachers for p in t.parameters()), "models": 3}


def test_finetune_adapts_without_touching_the_teacher(zoo):
    teachers, splits = zoo
    teacher = teachers[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ft = FineTune(teacher, way=5)
    tasks = task_list(splits["test"], 5, 1, query=5, tasks=15)
    untrained = evaluate(ft, splits["test"], tasks, adapt_kwargs={"steps": 0}, progress=False).accuracy
    tuned = evaluate(ft, splits["test"], tasks, adapt_kwargs={"lr": 0.1, "steps": 10}, progress=False).accuracy
    assert untrained == pytest.approx(20.0)  # a zero head predicts class 0 everywhere
    assert tuned > 60
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    ep = splits["test"].episode(tasks[0])
    ep.support_x.requires_grad_(True)
    ft.outer_loss(ep)[0].backward()
    assert ep.support_x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="5-way"):
        ft.adapt(ep.support_x[:3], torch.arange(3), 3)


def test_best_teacher_is_the_argmax_on_val(zoo):
    teachers, splits = zoo
    tasks = task_list(splits["val"], 5, 1, query=5, tasks=10)
    best, acc = best_teacher(teachers, splits["val"], tasks)
    scores = [evaluate(NearestCentroid([t]), splits["val"], tasks, progress=False).accuracy for t in teachers]
    assert acc == max(scores) and best is teachers[scores.index(acc)]


def test_run_baselines_gives_every_row_on_shared_tasks(zoo):
    teachers, splits = zoo
    cfg = BaselineConfig(shots=(1,), query=5, test_tasks=6, val_tasks=4, arch_args={"width": 8, "depth": 2},
                         maml=MAMLConfig(inner_lr=0.05), grid=TuningGrid(lr=(0.1,), steps=(1, 2)),
                         train=MetaTrainConfig(iterations=2, meta_batch=2, val_every=1))
    logged = []
    rows = run_baselines(splits, teachers, cfg, progress=False, log=logged.append)
    assert [r["method"] for r in rows] == list(METHODS) and logged == rows
    for r in rows:
        assert {"method", "way", "shot", "accuracy", "ci95", "test_cost", "seconds"} <= set(r)
        assert (r["way"], r["shot"], r["tasks"]) == (5, 1, 6) and 0 <= r["accuracy"] <= 100
    by = {r["method"]: r for r in rows}
    assert by["maml-random"]["settings"]["lr"] == 0.1 and set(by["maml-random"]["val_grid"]) == {
        "lr=0.1,steps=1", "lr=0.1,steps=2"}
    assert "settings" not in by["protonet-real"] and by["protonet-real"]["train_iterations"] == 2
    assert by["nc-all-teachers"]["test_cost"]["models"] == 3 and by["nc-best-teacher"]["test_cost"]["models"] == 1
    assert by["maml-random"]["seed"] == 0


def test_run_baselines_skips_what_the_zoo_cannot_give(zoo):
    teachers, splits = zoo
    cfg = BaselineConfig(shots=(1,), query=5, test_tasks=3, val_tasks=2, grid=TuningGrid(lr=(0.1,), steps=(1,)))
    rows = run_baselines({"val": splits["val"], "test": splits["test"]}, [], cfg,
                         methods=["nc-pixels", "nc-best-teacher"], progress=False)
    assert [r["method"] for r in rows] == ["nc-pixels"]
    mixed = teachers[:2] + [tiny_teacher(splits["train"], [0, 1, 2], seed=9, steps=1)]
    mixed[2].config.arch_args = {"width": 8, "depth": 2, "extra": 1}
    assert same_architecture(teachers) and not same_architecture(mixed)
    rows = run_baselines(splits, mixed, cfg, methods=["maml-avg-teachers", "nc-pixels"], progress=False)
    assert [r["method"] for r in rows] == ["nc-pixels"]
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(splits, teachers, cfg, methods=["nope"])
    with pytest.raises(ValueError, match="train"):
        run_baselines({"val": splits["val"], "test": splits["test"]}, teachers, cfg, methods=["maml-real"])


def test_precomputed_features_give_the_same_results(zoo):
    teachers, splits = zoo
    tasks = task_list(splits["test"], 5, 2, query=4, tasks=8, seed=3)
    for nc in (NearestCentroid(), NearestCentroid(teachers[:2])):
        cached = nc.extract(splits["test"], batch_size=7)
        direct = evaluate(nc, splits["test"], tasks, progress=False)
        assert cached.episode(tasks[0]).support_x.shape == (10, cached.features.shape[1])
        assert torch.allclose(cached.episode(tasks[0]).query_x, nc.features(splits["test"].episode(tasks[0]).query_x),
                              atol=1e-5)
        assert (evaluate(nc, cached, tasks, progress=False).task_acc == direct.task_acc).all()

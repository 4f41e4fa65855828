import math

import numpy as np
import pytest
import torch

from meta_synthetic import ARCH_ARGS, SIZE, template_images
from purer.baselines import NearestCentroid
from purer.evaluate import (EvalResult, TuningGrid, evaluate, fingerprint, mean_ci95, paired_difference,
                            select_test_time, task_list)
from purer.meta import MAML, MAMLConfig, ProtoNet, random_model


def test_ci95_on_a_known_vector():
    mean, ci = mean_ci95([0.0, 1.0, 0.0, 1.0])
    # sample std (ddof=1) of 0,1,0,1 is sqrt(1/3)
    assert mean == 0.5 and ci == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean_ci95([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_same_seed_same_task_list_and_a_new_seed_differs():
    data = template_images(12, per_class=20)
    a, b = task_list(data, 5, 1, tasks=20, seed=7), task_list(data, 5, 1, tasks=20, seed=7)
    assert [t.to_json() for t in a] == [t.to_json() for t in b] and fingerprint(a) == fingerprint(b)
    c = task_list(data, 5, 1, tasks=20, seed=8)
    assert fingerprint(c) != fingerprint(a)
    # task i depends only on (seed, i): a longer list starts with the shorter one
    assert fingerprint(task_list(data, 5, 1, tasks=30, seed=7)[:20]) == fingerprint(a)
    # 15 queries per class, or as many as a class has after the support
    assert a[0].query.shape == (5, 15) and task_list(data, 5, 5, tasks=1)[0].query.shape == (5, 15)
    small = template_images(12, per_class=8)
    assert task_list(small, 5, 5, tasks=1)[0].query.shape == (5, 3)


def test_two_methods_on_one_task_list_give_paired_rows():
    data = template_images(12, noise=0.3)
    tasks = task_list(data, 5, 1, query=5, tasks=25, seed=0)
    pixels = evaluate(NearestCentroid(), data, tasks, method="nc-pixels", progress=False)
    proto_learner = ProtoNet(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0))
    proto = evaluate(proto_learner, data, tasks, method="protonet", progress=False)
    assert pixels.tasks_id == proto.tasks_id == fingerprint(tasks)
    diff, ci = paired_difference(pixels, proto)
    assert diff == pytest.approx(pixels.accuracy - proto.accuracy)
    assert ci == pytest.approx(100 * 1.96 * np.std(pixels.task_acc - proto.task_acc, ddof=1) / 5)
    row = proto.row(seconds=1.0)
    assert {"method", "way", "shot", "accuracy", "ci95", "test_cost"} <= set(row)
    assert (row["method"], row["way"], row["shot"], row["tasks"], row["seconds"]) == ("protonet", 5, 1, 25, 1.0)
    assert row["test_cost"] == {"params": sum(p.numel() for p in proto_learner.parameters()), "models": 1}
    assert pixels.row()["test_cost"] == {"params": 0, "models": 0}
    other = evaluate(NearestCentroid(), data, task_list(data, 5, 1, query=5, tasks=25, seed=1), progress=False)
    with pytest.raises(ValueError, match="different task lists"):
        paired_difference(pixels, other)


def test_a_rows_cost_counts_the_inner_loops_steps():
    data = template_images(12)
    tasks = task_list(data, 5, 1, query=3, tasks=3)
    learner = MAML(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0), 5, config=MAMLConfig(inner_lr=0.5))
    params = sum(p.numel() for p in learner.parameters())
    row = evaluate(learner, data, tasks, adapt_kwargs={"lr": 0.1, "steps": 10}, progress=False).row()
    assert row["test_cost"] == {"params": params, "models": 1, "inner_steps": 10}
    # a row that runs no inner loop says so itself (SimpleShot), whatever the learner's settings
    assert EvalResult("s", 5, 1, np.ones(3), {"models": 1, "inner_steps": 0}, "x", {"steps": 10}).test_cost[
        "inner_steps"] == 0
    assert "inner_steps" not in evaluate(NearestCentroid(), data, tasks, progress=False).test_cost


def test_accuracy_is_the_mean_of_per_task_accuracies():
    r = EvalResult("m", 5, 1, np.array([0.2, 0.4, 0.9]), {}, "x")
    assert r.accuracy == pytest.approx(50.0) and r.ci95 == pytest.approx(100 * mean_ci95([0.2, 0.4, 0.9])[1])


def test_evaluate_leaves_the_learner_unchanged_and_restores_its_mode():
    data = template_images(12)
    learner = MAML(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0), 5, config=MAMLConfig(inner_lr=0.5))
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.train()
    evaluate(learner, data, task_list(data, 5, 1, query=3, tasks=3), progress=False)
    assert learner.training and all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())


def test_select_test_time_picks_the_best_grid_point_on_val():
    torch.manual_seed(0)
    val = template_images(12, seed=5)
    tasks = task_list(val, 5, 1, query=5, tasks=15, seed=0)
    learner = MAML(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0), 5)
    grid = TuningGrid(lr=(0.0, 0.5), steps=(1, 5))
    chosen = select_test_time(learner, val, tasks, grid)
    assert set(chosen.table) == {"lr=0.0,steps=1", "lr=0.0,steps=5", "lr=0.5,steps=1", "lr=0.5,steps=5"}
    assert chosen.val_accuracy == pytest.approx(max(chosen.table.values()), abs=0.01)
    assert chosen.settings["lr"] == 0.5  # lr 0 never adapts the random head: chance level
    again = evaluate(learner, val, tasks, adapt_kwargs=chosen.settings, progress=False).accuracy
    assert again == pytest.approx(chosen.val_accuracy)
    nothing = select_test_time(ProtoNet(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0)), val, tasks, grid)
    assert nothing.settings == {} and list(nothing.table) == ["default"]


@pytest.mark.parametrize("kind", ["nc-features", "maml"])
def test_chunked_evaluation_gives_the_per_task_accuracies(kind):
    """Tasks gathered and adapted together (vmap) score exactly as tasks taken one at a time."""
    data = template_images(12, noise=0.3)
    tasks = task_list(data, 5, 2, query=4, tasks=13, seed=1)
    if kind == "maml":
        learner = MAML(random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=0), 5, config=MAMLConfig(inner_lr=0.2,
                                                                                                   inner_steps=3))
        source = data
    else:
        learner = NearestCentroid()
        source = learner.extract(data)
    learner.task_batching = "vmap"
    together = evaluate(learner, source, tasks, progress=False, chunk=5)  # 5 + 5 + 3 tasks
    learner.task_batching = "loop"
    alone = evaluate(learner, source, tasks, progress=False, chunk=1)
    assert np.array_equal(together.task_acc, alone.task_acc) and together.tasks_id == alone.tasks_id
    assert 0 < together.accuracy <= 100

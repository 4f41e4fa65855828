"""SimpleShot (L2N) on the meta-learned features: the nearest normalised centroid, no inner loop."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from purer.calibrate import CalibratedLearner, SimpleShot, calibration_accuracies, calibrator, select_calibration
from purer.evaluate import task_accuracies, task_list

from test_icfil import episode, learners, test_set, trained_model  # noqa: F401 (fixtures)


def reference(learner, ep, way=5):
    """The rule written out: each class's mean of unit-length support features, the query's nearest by distance."""
    with torch.no_grad():
        s, q = F.normalize(learner.embed(ep.support_x), dim=1), F.normalize(learner.embed(ep.query_x), dim=1)
        centroids = torch.stack([s[ep.support_y == c].mean(0) for c in range(way)])
        return -torch.cdist(q, centroids) ** 2


@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
@pytest.mark.parametrize("shot", [1, 3])
def test_simpleshot_is_the_nearest_normalised_centroid_without_an_inner_loop(trained_model, test_set, kind, shot,
                                                                            monkeypatch):
    learner = learners(trained_model)[kind].eval()
    ep = episode(test_set, shot=shot)
    monkeypatch.setattr(type(learner), "adapt", lambda *a, **k: pytest.fail("SimpleShot ran the inner loop"))
    logits = calibrator("simpleshot").predict(learner, ep.support_x, ep.support_y, 5, ep.query_x, steps=3)
    assert logits.shape == (len(ep.query_x), 5)
    assert torch.allclose(logits, reference(learner, ep), atol=1e-5)


def test_simpleshot_reads_no_head_and_follows_the_support_labels(trained_model, test_set):
    """What it reads is the meta-learned features of the support and the queries: a new head predicts the same,
    and relabelling the support's classes relabels the prediction."""
    learner = learners(trained_model)["maml"].eval()
    ep = episode(test_set, shot=3)
    before = SimpleShot().predict(learner, ep.support_x, ep.support_y, 5, ep.query_x)
    with torch.no_grad():
        learner.model.head.weight.normal_()
        learner.model.head.bias.normal_()
    assert torch.allclose(SimpleShot().predict(learner, ep.support_x, ep.support_y, 5, ep.query_x), before, atol=1e-6)
    perm = torch.tensor([2, 0, 4, 1, 3])
    relabelled = SimpleShot().predict(learner, ep.support_x, perm[ep.support_y], 5, ep.query_x)
    assert torch.allclose(relabelled[:, perm], before, atol=1e-6)


def test_simpleshot_rows_share_the_pass_and_run_no_inner_loop(trained_model, test_set, monkeypatch):
    """Beside the plain row it reads no adaptation; alone it makes none; either way each row equals the row
    evaluated on its own, task by task."""
    learner = learners(trained_model)["maml"]
    tasks = task_list(test_set, 5, 1, query=4, tasks=4, seed=0)
    cals = [calibrator("none"), calibrator("simpleshot")]
    apart = torch.stack([task_accuracies(c.wrap(learner), test_set, tasks, adapt_kwargs={"steps": 2}, chunk=3)
                         for c in cals])
    assert isinstance(cals[1].wrap(learner), CalibratedLearner)
    calls = []
    adapt_task = type(learner).adapt_task
    monkeypatch.setattr(type(learner), "adapt_task", lambda self, *a, **k: calls.append(1) or adapt_task(self, *a, **k))
    both, _ = calibration_accuracies(learner, cals, test_set, tasks, adapt_kwargs={"steps": 2}, chunk=3)
    assert torch.equal(both, apart) and len(calls) == len(tasks)
    calls.clear()
    alone, seconds = calibration_accuracies(learner, cals[1:], test_set, tasks, adapt_kwargs={"steps": 2}, chunk=3)
    assert torch.equal(alone, apart[1:]) and not calls and seconds[0] > 0


def test_simpleshot_has_no_settings_to_search(trained_model, test_set):
    learner = learners(trained_model)["maml"]
    tasks = task_list(test_set, 5, 1, query=4, tasks=2, seed=0)
    cal, acc, table = select_calibration(calibrator("simpleshot"), {}, learner, test_set, tasks)
    assert cal.settings() == {} and len(table) == 1 and 0 <= acc <= 100
    with pytest.raises(ValueError, match="'simpleshot' has no settings"):
        calibrator("simpleshot").with_settings({"steps": 2})
    assert calibrator("simpleshot").test_cost(learner) == {"inner_steps": 0}


def test_a_saved_learner_gives_back_the_calibration_its_run_chose(trained_model, tmp_path):
    """``chosen_calibration`` reads the choice per shot from the model folder (the nearest shot chosen for), with
    its settings; a folder without one gives the plain learner, a missing folder a one-line error."""
    from purer.calibrate import ICFIL, NoCalibration, chosen_calibration

    learner = learners(trained_model)["maml"]
    learner.save_pretrained(tmp_path / "run", calibration={
        "1": {"name": "simpleshot", "settings": {}, "val_accuracy": 90.0},
        "5": {"name": "icfil", "settings": {"calibration_steps": 7}, "val_accuracy": 97.0}})
    assert isinstance(chosen_calibration(tmp_path / "run", 1), SimpleShot)
    assert isinstance(chosen_calibration(tmp_path / "run", 2), SimpleShot)
    five = chosen_calibration(tmp_path / "run", 10)
    assert isinstance(five, ICFIL) and five.config.calibration_steps == 7
    learner.save_pretrained(tmp_path / "plain")
    assert isinstance(chosen_calibration(tmp_path / "plain", 1), NoCalibration)
    with pytest.raises(ValueError, match="cannot read the run's choice of calibration"):
        chosen_calibration(tmp_path / "missing", 1)


def test_a_task_of_another_way_than_the_head_is_read_by_simpleshot_and_refused_by_the_inner_loop(trained_model,
                                                                                                   test_set):
    learner = learners(trained_model)["maml"].eval()  # a head of 5 outputs
    ep = episode(test_set, shot=3)
    s, q = ep.support_y < 3, ep.query_y < 3  # a 3-way task of the same images
    with pytest.raises(ValueError, match="built for 5-way tasks, got a 3-way episode; its features classify any way"):
        learner.adapt(ep.support_x[s], ep.support_y[s], 3)
    logits = SimpleShot().predict(learner, ep.support_x[s], ep.support_y[s], 3, ep.query_x[q])
    assert logits.shape == (int(q.sum()), 3)
    three = SimpleNamespace(support_x=ep.support_x[s], support_y=ep.support_y[s], query_x=ep.query_x[q])
    assert torch.allclose(logits, reference(learner, three, way=3), atol=1e-5)

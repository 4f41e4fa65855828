"""The few-shot canon's learners on the GPU path without a GPU (see tests/test_device.py): one adversarial ECI
iteration each on the ``meta`` device, tasks looped and vmapped, within the sync budget (one host read, the switch's; no stray read,
no blocking copy), then meta-validation and the meta-test rows; and the config refusals a run needs."""
from __future__ import annotations

import pytest

from purer.host import host_traffic
from purer.pipeline import RunConfig, evaluate_purer
from purer.pipeline.distributed import Dist
from purer.pipeline.run_config import NOT_CALIBRATABLE
from purer.yaml_config import load_config
from test_device import META, config, device_eci, no_stray, on_meta, splits, zoo  # noqa: F401 (fixtures)

# Each new learner as a run sets it (MTL freezes a pre-trained encoder: the averaged teachers, so its runs take the
# zoo's three Conv4 teachers); calibration rows for the learners a calibration can follow.
LEARNERS = {
    "matching": {"meta.matching.fce": True, "meta.matching.processing_steps": 2},
    "relation": {},
    "mtl": {"meta.init": "avg-teachers", "meta.mtl.inner_steps": 3},
    "l2f": {"eval.calibrations": []},  # its adapted state is MAML's fast weights: alfa's rows cover the path
    "alfa": {}, "metal": {}, "tao": {},
    "e3bm": {"meta.maml.inner_steps": 2},
    "e3bm-mtl": {"meta.learner": "e3bm", "meta.e3bm.base": "mtl", "meta.init": "avg-teachers",
                 "meta.mtl.inner_steps": 3},
}


def learner_config(tmp_path, name: str, **more) -> RunConfig:
    settings = {"meta.learner": name, **LEARNERS[name], "eval.calibration_grid": {}, **more}
    if settings["meta.learner"] in NOT_CALIBRATABLE:
        settings["eval.calibrations"] = []
    return config(tmp_path, **settings)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_an_eci_iteration_and_the_meta_test_of_each_learner_run_on_the_device(zoo, splits, tmp_path, name,
                                                                              batching):
    teachers, data = on_meta(zoo[:3] if LEARNERS[name].get("meta.init") == "avg-teachers" else zoo, splits)
    cfg = learner_config(tmp_path, name, **{"meta.task_batching": batching})
    eci = device_eci(cfg, teachers, data)
    assert eci.learner.tasks_together(META) == (batching == "vmap")
    eci.state.adversarial_next = True  # an adversarial iteration: a plain one's work and the learner's term
    with host_traffic() as traffic:
        numbers = eci.iteration()
    no_stray(traffic)
    assert dict(traffic.named) == {"switch": 1}
    assert all(v.device == META for v in numbers.values())
    assert eci.state.adversarial_steps == 1
    if batching == "vmap":
        return  # validation and meta-test evaluate tasks the same way: once is enough
    with host_traffic() as traffic:
        eci.validate()
        rows, _ = evaluate_purer(cfg, eci.learner, data, Dist(device=META), progress=False)
    no_stray(traffic)
    assert [r["method"] for r in rows] == ["purer"] + [f"purer+{c}" for c in cfg.eval.calibrations]


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_the_hard_task_meta_batch_reads_its_failure_classes_with_the_switch(zoo, splits, tmp_path, batching):
    """MTL's hard-task sampler with MAML: the failure classes come back in the switch's one read, and a hard
    task enters the meta-batch once ``way`` of them are pooled."""
    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path, **{"meta.hard_tasks": 1, "meta.task_batching": batching})
    eci = device_eci(cfg, teachers, data)
    for _ in range(3):
        with host_traffic() as traffic:
            eci.iteration()
        no_stray(traffic)
        assert dict(traffic.named) == {"switch": 1}
    # on the meta device every failure label reads as 0: each task's first class joins the pool
    assert eci.state.hard_pool or eci.state.hard_batches
    assert eci.summary()["hard_batches"] == eci.state.hard_batches


def test_a_run_refuses_what_a_learner_cannot_do_in_one_line(tmp_path):
    base = {"output_dir": str(tmp_path / "out")}
    for name in NOT_CALIBRATABLE:
        with pytest.raises(ValueError, match=r"set eval.calibrations=\[\]"):
            load_config(RunConfig, None, [f"{k}={v}" for k, v in {**base, "meta.learner": name}.items()])
        load_config(RunConfig, None, [f"{k}={v}" for k, v in {**base, "meta.learner": name,
                                                                "eval.calibrations": "[]"}.items()])
    for learner in ("mtl", "e3bm"):
        with pytest.raises(ValueError, match="meta.init=zoo-student"):
            load_config(RunConfig, None, [f"output_dir={tmp_path}", f"meta.learner={learner}", "meta.e3bm.base=mtl",
                                          "eval.calibrations=[]"])
    for name in ("matching", "relation"):  # no way-sized head: another way at test time is fine
        load_config(RunConfig, None, [f"meta.learner={name}", "eval.calibrations=[]", "eval.way=20"])
    # a way-sized head at another way: only the rows that read the features, and none is an error
    assert load_config(RunConfig, None, ["meta.learner=alfa", "eval.way=20"]).test_rows() == ["simpleshot"]
    with pytest.raises(ValueError, match="add simpleshot to eval.calibrations, or set eval.way=5"):
        load_config(RunConfig, None, ["meta.learner=alfa", "eval.way=20", "eval.calibrations=[icfil]"])
    with pytest.raises(ValueError, match="hard_tasks"):
        load_config(RunConfig, None, ["meta.hard_tasks=5"])


def test_a_way_the_head_cannot_take_keeps_only_the_rows_that_read_features():
    from purer.pipeline.run_config import EvalConfig, MetaConfig

    rows = ["none", "icfil", "support-ce", "simpleshot"]
    assert RunConfig().test_rows() == rows  # meta.way = eval.way: every row
    assert RunConfig(eval=EvalConfig(way=20)).test_rows() == ["simpleshot"]  # the 5-way L2F head: features only
    assert RunConfig(meta=MetaConfig(learner="protonet"), eval=EvalConfig(way=20)).test_rows() == rows  # any way
    with pytest.raises(ValueError, match="add simpleshot to eval.calibrations, or set eval.way=5"):
        RunConfig(eval=EvalConfig(way=20, calibrations=["icfil", "support-ce"]))

"""benchmarks/speed.py: one tiny meta-iteration gives positive, finite part times within its wall time."""
import math
import time

import pytest
from benchmark_scripts import load_benchmark

speed = load_benchmark("speed")


def test_iteration_parts_are_positive_and_fit_in_the_iteration():
    bench = speed.Bench(speed.Setting(teachers=3, teachers_per_step=2, image_size=16, images_per_class=2, query=2,
                                      meta_batch=2))
    start = time.perf_counter()
    parts = bench.iteration()
    wall = time.perf_counter() - start
    assert set(parts) == set(speed.PARTS + speed.DETAIL_PARTS)
    assert all(math.isfinite(v) and v > 0 for v in parts.values()), parts
    assert sum(parts.values()) <= wall  # the parts are disjoint intervals of the call
    summary = speed.summarise([parts, bench.iteration()])
    assert summary["meta_iteration"] == pytest.approx(sum(summary[k] for k in speed.PARTS))
    assert summary["floor"] == pytest.approx(summary["teacher_passes"] + summary["learner_passes"])


def test_zoo_size_times_replicas_side_by_side_and_reads_the_difference_against_their_spread():
    """benchmarks/zoo_size.py: the small and the large zoo in one process, and the reading of the numbers."""
    zs = load_benchmark("zoo_size")
    one = zs.measure([2, 3], rounds=1, per_round=1, quick=True)
    assert set(one) == {"2#0", "3#1"} and all(v["meta_iteration"] > v["inversion"] > 0 for v in one.values())
    one = {"10#0": {"meta_iteration": 0.50}, "100#1": {"meta_iteration": 0.52},
           "10#2": {"meta_iteration": 0.47}, "100#3": {"meta_iteration": 0.49}}
    sep = [{"teachers": 10, "meta_iteration": 0.6}, {"teachers": 100, "meta_iteration": 0.5},
           {"teachers": 10, "meta_iteration": 0.4}, {"teachers": 100, "meta_iteration": 0.5}]
    text = zs.reading(one, sep)
    assert "100 teachers minus 10: +0.020 s" in text and "differ by up to 0.030 s" in text
    assert "Separate processes: +0.000 s" in text and "differ by up to 0.200 s" in text


def test_kd_steps_one_work_item_and_one_per_teacher_are_timed_side_by_side(tiny_root, baseline_run, tmp_path):
    """benchmarks/distill_speed.py: both paths of distill.images=step run on one ECI, alternating, and are summarised
    by their medians after the warm-up rounds."""
    from purer.pipeline import RunConfig
    from purer.yaml_config import load_config
    from recipe_runs import overrides

    ds = load_benchmark("distill_speed")
    # the folder's teachers take colour: the colour rule (each teacher its own classes' images) off
    cfg = load_config(RunConfig, None, overrides(tiny_root, tmp_path, **{"distill.images": "step",
                                                                         "distill.images_colour": "null"}))
    seconds = ds.measure(cfg, rounds=3)
    assert set(seconds) == {"one item", "per teacher"}
    assert all(len(s) == 3 and all(math.isfinite(x) and x > 0 for x in s) for s in seconds.values())
    out = ds.summary({"one item": [9.0, 9.0, 1.0], "per teacher": [9.0, 9.0, 2.0]})
    assert out == {"median_s": {"one item": 1.0, "per teacher": 2.0}, "speedup": 2.0, "rounds": 3}
    with pytest.raises(SystemExit, match=r"distilled on their own classes' images \(distill.images_colour\)"):
        ds.measure(load_config(RunConfig, None, overrides(tiny_root, tmp_path, **{"distill.images": "step"})), 1)

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

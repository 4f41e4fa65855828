"""benchmarks/speed.py: one tiny meta-iteration gives positive, finite part times within its wall time."""
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("speed_benchmark",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py")
speed = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = speed  # dataclasses look their module up there
_spec.loader.exec_module(speed)


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

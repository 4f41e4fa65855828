"""benchmarks/gpu_check.py runs every step on the CPU in the suite, so it cannot rot before someone has a GPU."""
import json
import subprocess
import sys

from recipe_runs import REPO


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["problems"] == [] and report["quick"]
    assert set(report["step_seconds"]) == {"parity", "syncs", "vmap_fallbacks", "iterations", "meta_test", "recipe"}
    assert report["syncs"]["named"] == {"switch": 1} and report["recipe"]["deterministic_identical"]
    assert report["recipe"]["fp16_refused"] and report["recipe"]["bf16_ok"]
    assert max(report["parity"].values()) <= 1e-9


def test_without_cuda_it_says_so_and_exits_0():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("no CUDA"), res.stdout + res.stderr

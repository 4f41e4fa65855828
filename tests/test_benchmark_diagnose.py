"""benchmarks/diagnose.py --adversary: the Gradient Switch's pull on the bank against the priors'."""
import pytest
import torch

from benchmark_scripts import load_benchmark
from meta_synthetic import ARCH_ARGS, SIZE, template_images, tiny_teacher
from purer.pipeline import ECI, RunConfig
from purer.pipeline.distributed import Dist
from purer.yaml_config import load_config


@pytest.fixture(scope="module")
def zoo():
    data = template_images(num_classes=9)
    return [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i, steps=10) for i in range(3)]


def eci(zoo, tmp_path, lambda_adv: float) -> ECI:
    overrides = {"data.image_size": SIZE, "meta.arch_args": ARCH_ARGS, "meta.way": 3, "meta.shot": 1,
                 "meta.query": 2, "meta.val_tasks": 2, "eval.way": 3, "inversion.teachers_per_step": 2,
                 "switch.lambda_adv": lambda_adv, "seed": 3, "cache_dir": str(tmp_path / "cache"),
                 "output_dir": str(tmp_path / "out")}
    cfg = load_config(RunConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    return ECI(cfg, zoo, {"val": template_images(num_classes=4, seed=1, name="val")}, Dist(device="cpu"))


def test_the_adversary_pulls_in_proportion_to_lambda_adv_and_the_priors_do_not_move(zoo, tmp_path):
    balance = load_benchmark("diagnose").adversary_balance
    one, three = (balance(eci(zoo, tmp_path, lam), tasks=6) for lam in (1.0, 3.0))
    assert one["classes"] == three["classes"] > 0
    assert three["prior"] == pytest.approx(one["prior"], rel=1e-5) and one["prior"] > 0
    assert three["adversary"] == pytest.approx(3 * one["adversary"], rel=1e-4) and one["adversary"] > 0
    assert three["ratio"] == pytest.approx(3 * one["ratio"], rel=1e-4)


def test_the_balance_leaves_the_bank_and_its_reads_as_they_were(zoo, tmp_path):
    e = eci(zoo, tmp_path, 10.0)
    before = [p.detach().clone() for p in e.bank.logits]
    load_benchmark("diagnose").adversary_balance(e, tasks=2)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, e.bank.logits))
    assert not e.bank.pop_touched()

"""The GPU path without a GPU: every stage of a run on the ``meta`` device, and the host reads it makes.

Tensors on the ``meta`` device carry shapes and dtypes but no data.  An operation that
mixes in a tensor of another device (a buffer left on the CPU, an index copied to the
wrong place) raises, as it would on CUDA; :class:`purer.host.HostTraffic` counts every
read back to the host (answering it with zeros, so the code goes on) and every
blocking host-to-device copy.  So the stages below run the library's own code (the
run's :class:`~purer.pipeline.ECI`, meta-test, calibrations, baselines, the model
folder) as a GPU run would, and fail on a device bug.

The sync budget: outside logging steps, one ECI meta-iteration reads one number on
the host (the pseudo-query accuracy the Gradient Switch decides on) and makes no
blocking copy.
"""
from __future__ import annotations

import copy
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meta_synthetic import ARCH_ARGS, SIZE, template_images, tiny_teacher
from purer.baselines import METHODS
from purer.host import host_traffic
from purer.meta import MetaLearner
from purer.pipeline import ECI, RunConfig, evaluate_purer
from purer.pipeline.baselines import baseline_rows
from purer.pipeline.distributed import Dist
from purer.yaml_config import load_config
from purer.zoo import ModelConfig, Teacher, build_model

META = torch.device("meta")


def resnet_teacher(data, classes: list[int], size: int = 12) -> Teacher:
    """A random ResNet-10 teacher of another input size (a second contract), its BN statistics from one batch."""
    torch.manual_seed(7)
    model = build_model("resnet10", len(classes), in_channels=1, image_size=size, arch_args={"width": 4})
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, size, size))
    config = ModelConfig(arch="resnet10", num_classes=len(classes), class_ids=[data.class_names[c] for c in classes],
                         in_channels=1, image_size=size, mean=[0.5], std=[0.25], arch_args={"width": 4})
    return Teacher(model, config, model_id="r0")


@pytest.fixture(scope="module")
def zoo():
    data = template_images(num_classes=12)
    return [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i) for i in range(3)] + [
        resnet_teacher(data, [9, 10, 11])]


@pytest.fixture(scope="module")
def splits():
    return {"train": template_images(num_classes=6, seed=3, name="train"),
            "val": template_images(num_classes=5, seed=1, name="val"),
            "test": template_images(num_classes=5, seed=2, name="test")}


def config(tmp_path, **overrides) -> RunConfig:
    base = {"data.image_size": SIZE, "meta.arch_args": ARCH_ARGS, "meta.way": 3, "meta.shot": 1, "meta.query": 2,
            "meta.train.meta_batch": 2, "meta.val_tasks": 2, "inversion.teachers_per_step": 3,
            "meta.train.average": 0.9, "meta.train.schedule": "cosine",
            "distill.logit": 1.0, "distill.feature": 1.0, "distill.relation": 1.0, "distill.teachers_per_step": 2,
            "switch.warmup": 0, "eval.way": 3, "eval.shots": [1], "eval.tasks": 2, "eval.val_tasks": 2,
            "eval.query": 2, "eval.grid.lr": [0.1], "eval.grid.steps": [1],
            "eval.calibration_grid": {"icfil": {"calibration_lr": [1e-4, 1e-3]}},
            "icfil.inversion_steps": 2, "icfil.calibration_steps": 1, "icfil.pseudo_per_class": 2,
            "eval.baseline_train_iterations": 2, "cache_dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "out"), "meta.init": "best-teacher",
            # the zoo mixes Conv4 and ResNet-10 teachers: inversion.synthesizer decides, not the rule for such a zoo
            "inversion.synthesizer_heterogeneous": "null", **overrides}
    return load_config(RunConfig, None, [f"{k}={v}" for k, v in base.items()])


def on_meta(zoo, splits):
    """Copies of the zoo and the splits on the meta device (``Module.to`` moves in place)."""
    return [copy.deepcopy(t).to(META) for t in zoo], {k: v.to(META) for k, v in splits.items()}


def no_stray(traffic) -> None:
    assert not traffic.stray, f"host reads outside purer.host: {dict(traffic.stray)}"
    assert not traffic.blocking_copies, f"blocking host-to-device copies: {dict(traffic.blocking_copies)}"


def device_eci(cfg: RunConfig, teachers, data) -> ECI:
    """The run's ECI built on the meta device: with :func:`config`'s ``meta.init: best-teacher`` that scores the
    teachers on meta-val, whose reads (answered with zeros) must all be named (building moves modules to the
    device: the copies of a setup, not of an iteration)."""
    with host_traffic() as traffic:
        eci = ECI(cfg, teachers, {"val": data["val"]}, Dist(device=META))
    assert not traffic.stray, f"host reads outside purer.host: {dict(traffic.stray)}"
    return eci


@pytest.mark.parametrize("batching,synthesizer,images", [("loop", "pixels", "own"), ("vmap", "pixels", "own"),
                                                         ("loop", "generator", "own"), ("vmap", "generator", "own"),
                                                         ("vmap", "pixels", "step")],
                         ids=["loop", "vmap", "generator-loop", "generator-vmap", "step"])
def test_an_eci_iteration_runs_on_the_device_and_reads_one_number(zoo, splits, tmp_path, batching, synthesizer,
                                                                   images):
    """The sync budget: one host read per meta-iteration (the switch's), none stray, no blocking copy; the
    iteration covers an adversarial inversion step (by the pixel bank or the generator), zoo distillation
    (logits, features and relations, on each teacher's own images or on the step's, the rule of a zoo whose
    teachers are not all colour) and the meta-step with tasks looped or vmapped (at an annealed outer lr, into a weight average),
    over a zoo of two input contracts; meta-val scores the average."""
    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path, **{"meta.task_batching": batching, "inversion.teacher_batching": batching,
                              "inversion.synthesizer": synthesizer, "inversion.generator.steps": 2,
                              "distill.images": images, "distill.images_heterogeneous": "null"})
    eci = device_eci(cfg, teachers, data)
    assert eci.synthesizer == synthesizer and eci.distillation.images == images
    assert eci.learner.tasks_together(META) == (batching == "vmap")
    assert all(p.device == META for p in [*eci.learner.parameters(), *eci.bank.parameters()])
    if synthesizer == "generator":
        assert all(p.device == META for p in eci.inversion.generator.parameters())
    for adversarial in (False, True):
        eci.state.adversarial_next = adversarial
        with host_traffic() as traffic:
            numbers = eci.iteration()
        no_stray(traffic)
        assert dict(traffic.named) == {"switch": 1}
        assert all(v.device == META for v in numbers.values())
        assert {"meta/loss", "inversion/ce", "distill/logit_kd", "distill/feature_cos", "distill/relation"} <= set(numbers)
    assert eci.state.adversarial_steps == 1 and eci.inversion.steps == 2
    with host_traffic() as traffic:  # selection on meta-val: one read of the accuracies
        eci.validate()
    no_stray(traffic)
    assert dict(traffic.named) == {"result": 1}


def test_plain_episode_inversion_never_turns_adversarial(zoo, splits, tmp_path):
    teachers, data = on_meta(zoo, splits)
    eci = device_eci(config(tmp_path, **{"switch.lambda_adv": 0}), teachers, data)
    eci.state.adversarial_next = True  # the switch fired: with lambda_adv 0 the bank update stays plain
    with host_traffic():
        eci.iteration()
    assert eci.state.adversarial_steps == 0


def test_meta_test_rows_run_on_the_device(zoo, splits, tmp_path):
    """Every calibration row (plain, ICFIL with its settings chosen on meta-val, support CE, SimpleShot) on the
    device."""
    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path)
    eci = device_eci(cfg, teachers, data)
    with host_traffic() as traffic:
        rows, chosen = evaluate_purer(cfg, eci.learner, data, Dist(device=META), progress=False)
    no_stray(traffic)
    assert [r["method"] for r in rows] == ["purer", "purer+icfil", "purer+support-ce", "purer+simpleshot"]
    assert set(traffic.named) <= {"result", "checkpoint"}


def test_meta_test_at_a_way_the_head_cannot_take_runs_on_the_device(zoo, splits, tmp_path):
    """A 3-way learner meta-tested on 5-way tasks: SimpleShot's row alone, on the device."""
    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path, **{"eval.way": 5})
    eci = device_eci(cfg, teachers, data)
    with host_traffic() as traffic:
        rows, chosen = evaluate_purer(cfg, eci.learner, data, Dist(device=META), progress=False)
    no_stray(traffic)
    assert [(r["method"], r["way"]) for r in rows] == [("purer+simpleshot", 5)] and chosen[1]["name"] == "simpleshot"
    assert set(traffic.named) <= {"result", "checkpoint"}


@pytest.mark.parametrize("learner", ["anil", "protonet"])
def test_each_calibration_runs_on_the_device_after_any_learner(zoo, splits, tmp_path, learner):
    from purer.calibrate import calibrator
    from purer.evaluate import evaluate, task_list

    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path, **{"meta.learner": learner})
    eci = device_eci(cfg, teachers, data)
    for name in ("none", "icfil", "support-ce", "simpleshot"):
        with host_traffic() as traffic:
            evaluate(calibrator(name, cfg.icfil).wrap(eci.learner), data["test"], task_list(data["test"], 3, 1, 2, 2),
                     progress=False)
        no_stray(traffic)


def test_every_baseline_runs_on_the_device(zoo, splits, tmp_path):
    teachers, data = on_meta(zoo, splits)
    cfg = config(tmp_path, **{"eval.baselines": list(METHODS)})
    with host_traffic() as traffic:
        rows = baseline_rows(cfg, {"glyphs": data}, teachers[:3], progress=False)
    no_stray(traffic)
    assert {r["method"] for r in rows} == set(METHODS)


def test_a_saved_learner_loads_onto_a_device(zoo, splits, tmp_path):
    cfg = config(tmp_path)
    eci = ECI(cfg, zoo, {"val": splits["val"]}, Dist(device="cpu"))
    eci.learner.save_pretrained(tmp_path / "learner")
    learner = MetaLearner.from_pretrained(tmp_path / "learner", device=META)
    assert all(t.device == META for t in [*learner.parameters(), *learner.buffers()])
    data = splits["test"].to(META)
    from purer.evaluate import evaluate, task_list

    with host_traffic() as traffic:
        evaluate(learner, data, task_list(data, 3, 1, 2, 2), progress=False)
    no_stray(traffic)


def test_a_cpu_tensor_mixed_into_a_device_stage_is_caught(zoo, splits, tmp_path):
    """What the dry run is for: a teacher whose normalisation stayed on the CPU (the ICFIL crash of a GPU run)."""
    teachers, data = on_meta(zoo, splits)
    teachers[0].mean = torch.tensor([0.5])  # a buffer left behind on the CPU
    # a random start: choosing the best teacher would meet the CPU buffer first, before the iteration
    eci = ECI(config(tmp_path, **{"inversion.teachers_per_step": 4, "meta.init": "random"}), teachers,
              {"val": data["val"]}, Dist(device=META))
    with pytest.raises((RuntimeError, NotImplementedError), match="device"), host_traffic():
        eci.iteration()


# Operations torch runs nondeterministically on CUDA (and refuses under torch.use_deterministic_algorithms):
# the backward passes of grid_sample, bilinear interpolation and adaptive pooling (but for an output of one
# pixel, which torch computes as a mean), and friends.
NONDETERMINISTIC_ON_CUDA = ("grid_sampler_2d_backward", "upsample_bilinear2d_backward", "_adaptive_avg_pool2d_backward",
                            "adaptive_max_pool2d_backward", "reflection_pad2d_backward", "upsample_bicubic2d_backward",
                            "nll_loss2d_forward", "put_", "histc", "median")


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten operation run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_the_default_path_has_no_operation_that_is_nondeterministic_on_cuda(zoo, splits, tmp_path):
    """deterministic=true must be able to hold on a GPU: an ECI iteration (augmentation, teachers of two sizes,
    ResNet and Conv4, distillation, the adversarial term) and the meta-test rows use none of torch's list."""
    cfg = config(tmp_path)
    eci = ECI(cfg, zoo, {"val": splits["val"]}, Dist(device="cpu"))
    eci.state.adversarial_next = True
    with OpRecorder() as recorder:
        eci.iteration()
        evaluate_purer(cfg, eci.learner, splits, Dist(device="cpu"), progress=False)
    assert {"convolution_backward", "mm"} <= recorder.ops  # the recorder sees the backward passes
    assert not recorder.ops & set(NONDETERMINISTIC_ON_CUDA), recorder.ops & set(NONDETERMINISTIC_ON_CUDA)

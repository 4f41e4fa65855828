"""Issue 22's end-to-end check: real checkpoints of every kind people hold (torchvision state dicts with their own
names as safetensors and .pth, a timm state dict, a ResNet-12 from `purer-zoo pretrain`, a user's class from a
package, a timm Hugging Face folder) registered from one manifest into one zoo, then 5 ECI iterations and a
10-task meta-test on that zoo through the recipe (its baselines worker importing the user's package too); each
malformed row gives one line and registers nothing."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models import save_for_hf

from purer.zoo import Zoo
from purer.zoo.cli import main
from recipe_runs import overrides, recipe
from test_ingest import randomised, user_package

CLASSES = [f"train{i:02d}" for i in range(10)]  # the tiny dataset's meta-train classes (recipe_runs)


def ids(*k: int) -> str:
    return ",".join(CLASSES[i] for i in k)


def checkpoints(tmp: Path, tiny_root: Path) -> list[dict]:
    """Every kind of checkpoint, written as people write them, and the manifest rows that describe them."""
    torch.manual_seed(0)
    rows = []
    for name, args, suffix, classes in [("resnet18", {}, ".safetensors", (0, 1, 2, 3, 4)),
                                        ("resnet18", {}, ".pth", (5, 6, 7, 8, 9)),
                                        ("mobilenet_v3_small", {"width_mult": 0.25}, ".safetensors", (0, 2, 4)),
                                        ("mobilenet_v3_small", {"width_mult": 0.25}, ".pth", (1, 3, 5))]:
        net = randomised(torchvision.models.get_model(name, weights=None, num_classes=len(classes), **args))
        file = tmp / f"tv-{name}{suffix}"
        if suffix == ".pth":
            torch.save(net.state_dict(), file)
        else:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file))
        rows.append({"file": file.name, "id": f"tv-{name}-{suffix[1:]}", "arch": f"tv:{name}",
                     "arch_args": json.dumps(args), "class_ids": ids(*classes), "image_size": 16 if suffix == ".pth"
                     else 24, "mean": "0.5", "std": "0.25", "in_channels": ""})
    torch.save(randomised(timm.create_model("test_resnet", pretrained=False, num_classes=4)).state_dict(),
               tmp / "timm-test-resnet.pth")
    rows.append({"file": "timm-test-resnet.pth", "arch": "timm:test_resnet", "class_ids": ids(6, 7, 8, 9),
                 "image_size": 16})  # mean/std from timm's data config, channels from the weights
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tiny_root), "--image-size", "16",
                 "--num-models", "1", "--classes-per-model", "4", "--epochs", "1", "--arch", "resnet12",
                 "--arch-args", '{"widths": [8, 8, 16, 16]}', "--zoo", str(tmp / "pretrained"), "--quiet"]) == 0
    rows.append({"file": "pretrained/resnet12-000", "id": "resnet12"})  # purer's model folder, as it is
    from mypkg.nets import MyNet

    torch.save(randomised(MyNet(5, in_channels=1, width=8)).state_dict(), tmp / "mine.pth")
    rows.append({"file": "mine.pth", "arch": "mypkg.nets:MyNet", "arch_args": '{"width": 8}', "class_ids": ids(*range(5)),
                 "image_size": 16, "mean": "0.5", "std": "0.3"})
    save_for_hf(randomised(timm.create_model("test_efficientnet", pretrained=False, num_classes=3)),
                tmp / "hf-efficientnet", model_config={"label_names": CLASSES[7:]},
                data_config={"input_size": (3, 20, 20)}, safe_serialization=True)
    rows.append({"file": "hf-efficientnet"})  # a Hugging Face folder, as it is
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    fields = ["file", "id", "arch", "arch_args", "class_ids", "in_channels", "image_size", "mean", "std"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


BAD_ROWS = {  # the second row (the torchvision .pth) made malformed
    "wrong keys": ({"arch": "tv:resnet34"}, "models.csv row 2: ", "weights do not fit the architecture "
                                                                  "'tv:resnet34' (its library's own tensor names)"),
    "missing mean/std": ({"mean": "", "std": ""}, "models.csv row 2: ", "no mean and std"),
    "wrong channel count": ({"in_channels": "1"}, "models.csv row 2: ",
                            "its first convolution 'conv1.weight' takes 3 input channel(s), not the 1 stated"),
    "missing file": ({"file": "gone.pth"}, "models.csv row 2: ", "weights file not found"),
}


def test_a_zoo_of_every_kind_registers_from_one_manifest_and_runs_end_to_end(tiny_root, tmp_path, monkeypatch,
                                                                            capsys):
    package = user_package(tmp_path / "src")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")]))
    rows = checkpoints(tmp_path, tiny_root)
    zoo = tmp_path / "zoo"
    capsys.readouterr()

    for case, (change, where, what) in BAD_ROWS.items():
        bad = [dict(r) for r in rows]
        bad[1].update(change)
        assert main(["register", "--manifest", str(write_manifest(tmp_path / "models.csv", bad)),
                     "--zoo", str(zoo)]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"purer-zoo: error: {where}") and what in err[0], (case, err)
        assert not zoo.exists(), case  # nothing registered, not even an empty zoo

    assert main(["register", "--manifest", str(write_manifest(tmp_path / "models.csv", rows)), "--zoo", str(zoo)]) == 0
    assert main(["list", "--zoo", str(zoo)]) == 0
    listed = capsys.readouterr().out
    archs = {"tv:resnet18", "tv:mobilenet_v3_small", "timm:test_resnet", "resnet12", "mypkg.nets:MyNet",
             "timm:test_efficientnet"}
    assert all(a in listed for a in archs) and len(Zoo(zoo)) == 8 and Zoo(zoo).verify() == []
    timm_cfg = Zoo(zoo).config("timm-test-resnet")
    assert (timm_cfg.mean, timm_cfg.in_channels) == ([0.5, 0.5, 0.5], 3)
    assert Zoo(zoo).config("mine").in_channels == 1 and Zoo(zoo).config("hf-efficientnet").image_size == 20
    before = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}

    out = tmp_path / "run"
    res = recipe(overrides(tiny_root, out, 5, **{
        "zoo.path": str(zoo), "eval.tasks": 10, "meta.arch": "resnet12", "meta.arch_args": "{widths: [8, 8, 16, 16]}",
        "eval.baselines": "[nc-best-teacher, nc-all-teachers]", "eval.calibrations": "[]"}))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["zoo"]["archs"]) == archs and results["zoo"]["models"] == 8
    assert results["meta_train"]["iterations"] == 5 and results["tasks"] == 10
    # teachers of several architectures (and input contracts): the generator synthesizes the bank
    assert results["meta_train"]["synthesizer"] == "generator"
    # The baselines ran in the spawned worker, which rebuilt every teacher (the user's class too) from config.json.
    assert "baselines: computing them in a background process" in res.stdout
    assert {r["method"] for r in results["rows"]} == {"purer", "nc-best-teacher", "nc-all-teachers"}
    assert json.loads((out / "meta_learner" / "config.json").read_text())["arch"] == "resnet12"
    after = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}
    assert after == before  # a registered zoo is never written by a run

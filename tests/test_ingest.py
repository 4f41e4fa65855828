"""Ingesting the checkpoints people already have: torchvision / timm / ResNet-12 / a user's class / model
folders, one at a time or from a manifest, and every malformed variant as one line that registers nothing."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import purer.data
from purer.zoo import Zoo, build_model
from purer.zoo.cli import main
from purer.zoo.teacher import prepare_input
from zoo_synthetic import SIZE, separable_images, tiny_model

REPO = Path(__file__).resolve().parents[1]
NONE = ["--mean", "0", "--std", "1"]


def one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("purer-zoo: error: "), err
    for f in fragments:
        assert f in lines[0], (f, err)
    return lines[0]


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with random BatchNorm running statistics (so a wrong mapping of them would show in the logits)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def assert_same_logits(zoo: Zoo, model_id: str, native: nn.Module, channels: int, size: int, mean, std) -> None:
    x = torch.rand(2, channels, size, size)
    teacher = zoo.load_teacher(model_id)
    with torch.no_grad():
        expected = native(prepare_input(x, channels, size, torch.tensor(mean), torch.tensor(std)))
        torch.testing.assert_close(teacher(x), expected)


def save_both(state: dict, stem: Path) -> tuple[Path, Path]:
    st, pth = stem.with_suffix(".safetensors"), stem.with_suffix(".pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    torch.save(state, pth)
    return st, pth


# ------------------------------------------------------------------------------------------ architectures

@pytest.mark.parametrize("name,args,head", [("resnet18", {}, "fc"),
                                            ("mobilenet_v3_small", {"width_mult": 0.25}, "classifier.3")])
def test_torchvision_state_dicts_register_under_their_own_names(name, args, head, tmp_path, capsys):
    native = randomised(torchvision.models.get_model(name, weights=None, num_classes=5, **args))
    st, pth = save_both(native.state_dict(), tmp_path / name)
    zoo = tmp_path / "zoo"
    common = ["--arch", f"tv:{name}", "--arch-args", json.dumps(args), "--class-ids", "a,b,c,d,e",
              "--image-size", "32", "--mean", "0.5,0.4,0.3", "--std", "0.2", "--zoo", str(zoo)]
    assert main(["register", str(st), *common]) == 0
    assert main(["register", str(pth), "--id", "from-pth", *common]) == 0
    out = capsys.readouterr().out
    assert f"in_channels read from '{next(iter(native.state_dict()))}'" in out
    z = Zoo(zoo)
    assert z.verify() == [] and z.config(name).in_channels == 3
    assert z.load_teacher(name).model.native_head == head
    for model_id in (name, "from-pth"):
        assert_same_logits(z, model_id, native, 3, 32, [0.5, 0.4, 0.3], [0.2])


def test_purer_layout_of_torchvision_models_still_loads(tmp_path):
    model = randomised(build_model("tv:mobilenet_v3_small", 3, 1, 16, {"width_mult": 0.25}))
    assert next(iter(model.state_dict())).startswith("encoder.0.")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"))
    assert main(["register", str(tmp_path / "old.safetensors"), "--arch", "tv:mobilenet_v3_small", "--arch-args",
                 '{"width_mult": 0.25}', "--class-ids", "a,b,c", "--image-size", "16", *NONE,
                 "--zoo", str(tmp_path / "zoo")]) == 0
    z = Zoo(tmp_path / "zoo")
    assert z.config("old").in_channels == 1
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(z.load_teacher("old")(x), model(x))


def test_timm_takes_size_and_normalisation_from_its_config_and_channels_from_the_weights(tmp_path, capsys):
    import timm  # in the dev extra: CI runs these
    native = randomised(timm.create_model("resnet10t", pretrained=False, num_classes=4))
    torch.save(native.state_dict(), tmp_path / "t.pth")
    assert main(["register", str(tmp_path / "t.pth"), "--arch", "timm:resnet10t", "--class-ids", "a,b,c,d",
                 "--zoo", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    assert "mean/std from timm's data config" in out and "image size from timm's pretrained config (176)" in out
    cfg = Zoo(tmp_path / "zoo").config("t")
    assert (cfg.in_channels, cfg.image_size, cfg.mean, cfg.std) == (3, 176, [0.485, 0.456, 0.406],
                                                                    [0.229, 0.224, 0.225])
    assert_same_logits(Zoo(tmp_path / "zoo"), "t", native, 3, 176, cfg.mean, cfg.std)

    grey = randomised(timm.create_model("resnet10t", pretrained=False, num_classes=4, in_chans=1))
    torch.save(grey.state_dict(), tmp_path / "grey.pth")
    assert main(["register", str(tmp_path / "grey.pth"), "--arch", "timm:resnet10t", "--class-ids", "a,b,c,d",
                 "--image-size", "32", "--zoo", str(tmp_path / "zoo")]) == 2
    one_line_error(capsys, "'conv1.0.weight' takes 1 input channel(s), but mean/std have 3 values")
    assert main(["register", str(tmp_path / "grey.pth"), "--arch", "timm:resnet10t", "--class-ids", "a,b,c,d",
                 "--image-size", "32", "--mean", "0.5", "--std", "0.25", "--zoo", str(tmp_path / "zoo")]) == 0
    assert Zoo(tmp_path / "zoo").config("grey").in_channels == 1
    assert_same_logits(Zoo(tmp_path / "zoo"), "grey", grey, 1, 32, [0.5], [0.25])


def test_a_timm_hugging_face_folder_is_imported_as_it_is(tmp_path, capsys):
    import timm  # in the dev extra: CI runs these
    from timm.models import save_for_hf

    native = randomised(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3))
    save_for_hf(native, tmp_path / "hf-mobilenet", model_config={"label_names": ["cat", "dog", "fox"]},
                safe_serialization=True)
    assert main(["register", str(tmp_path / "hf-mobilenet"), "--image-size", "32", "--zoo", str(tmp_path / "zoo")]) == 0
    assert "class ids from its config.json; mean/std from its config.json" in capsys.readouterr().out
    cfg = Zoo(tmp_path / "zoo").config("hf-mobilenet")
    assert (cfg.arch, cfg.class_ids, cfg.image_size, cfg.mean) == ("timm:mobilenetv3_small_050", ["cat", "dog", "fox"],
                                                                   32, [0.485, 0.456, 0.406])
    assert_same_logits(Zoo(tmp_path / "zoo"), "hf-mobilenet", native, 3, 32, cfg.mean, cfg.std)


def test_a_purer_model_folder_is_imported_as_it_is(tmp_path):
    first = Zoo(tmp_path / "first", create=True)
    from purer.zoo import ModelConfig

    first.add("m", tiny_model(), ModelConfig("conv4", 5, list("abcde"), 1, SIZE, [0.3], [0.2], "mine", {"width": 8},
                                             metrics={"heldout_acc": 0.9}))
    assert main(["register", str(first.path / "m"), "--id", "copy", "--zoo", str(tmp_path / "second")]) == 0
    copy = Zoo(tmp_path / "second").config("copy")
    assert {k: v for k, v in copy.to_dict().items()} == first.config("m").to_dict()


def test_resnet12_is_the_few_shot_resnet12():
    model = build_model("resnet12", 5, 3, 84)
    blocks = list(model.encoder)[:4]
    assert [b.conv1.out_channels for b in blocks] == [64, 160, 320, 640] and model.feature_dim == 640
    assert all(sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in b.modules()) == 3 for b in blocks)
    assert model.features(torch.rand(2, 3, 84, 84)).shape == (2, 640)
    small = build_model("resnet12", 5, 1, 16, {"widths": [4, 4, 8, 8], "drop_rate": 0.5, "dropblock_size": 2})
    x = torch.rand(8, 1, 16, 16)
    small.eval()
    assert torch.equal(small(x), small(x))  # DropBlock is off at inference
    small.train()
    torch.manual_seed(0)
    a = small.features(x)
    assert not torch.equal(a, small.features(x))  # ... and on in training when asked
    with pytest.raises(ValueError, match="widths must be 4"):
        build_model("resnet12", 5, arch_args={"widths": [8, 8]})


@pytest.fixture
def synthetic_split(monkeypatch):
    data = separable_images(num_classes=10, per_class=10)
    monkeypatch.setattr(purer.data, "load_split", lambda *a, **k: data)


def test_resnet12_pretrains_from_the_cli_and_registers_from_its_folder(tmp_path, synthetic_split):
    zoo = tmp_path / "zoo"
    assert main(["pretrain", "--num-models", "1", "--epochs", "1", "--image-size", str(SIZE), "--arch", "resnet12",
                 "--arch-args", '{"widths": [4, 4, 8, 8]}', "--zoo", str(zoo), "--quiet"]) == 0
    assert Zoo(zoo).ids() == ["resnet12-000"] and main(["verify", "--zoo", str(zoo)]) == 0
    assert main(["register", str(zoo / "resnet12-000"), "--zoo", str(tmp_path / "other")]) == 0
    assert Zoo(tmp_path / "other").config("resnet12-000").arch_args == {"widths": [4, 4, 8, 8]}


USER_NET = '''
from torch import nn

class MyNet(nn.Module):
    """A user's classifier: features then a final linear layer."""
    def __init__(self, num_classes, in_channels=3, width=4, batch_norm=True):
        super().__init__()
        norm = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), norm, nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))
'''


def user_package(root: Path) -> Path:
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "nets.py").write_text(USER_NET)
    return root


def test_a_users_class_by_import_path_in_every_process(tmp_path, monkeypatch, capsys):
    pkg = user_package(tmp_path / "src")
    monkeypatch.syspath_prepend(str(pkg))
    from mypkg.nets import MyNet

    native = randomised(MyNet(3, in_channels=1, width=4))
    torch.save(native.state_dict(), tmp_path / "mine.pth")
    zoo = tmp_path / "zoo"
    assert main(["register", str(tmp_path / "mine.pth"), "--arch", "mypkg.nets:MyNet", "--arch-args", '{"width": 4}',
                 "--class-ids", "a,b,c", "--image-size", "8", *NONE, "--zoo", str(zoo)]) == 0
    assert_same_logits(Zoo(zoo), "mine", native, 1, 8, [0.0], [1.0])
    # The file form, relative to where the command runs, is recorded absolute ...
    monkeypatch.chdir(pkg)
    assert main(["register", str(tmp_path / "mine.pth"), "--id", "by-file", "--arch", "mypkg/nets.py:MyNet",
                 "--arch-args", '{"width": 4}', "--class-ids", "a,b,c", "--image-size", "8", *NONE,
                 "--zoo", str(zoo)]) == 0
    assert Zoo(zoo).config("by-file").arch == f"{pkg / 'mypkg' / 'nets.py'}:MyNet"
    # ... so a fresh process elsewhere loads it; the module form needs the package importable there.
    code = (f"from purer.zoo import Zoo; z = Zoo({str(zoo)!r}); z.load_teacher('by-file'); "
            "z.load_teacher('mine')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert "ValueError: model 'mine' of zoo" in res.stderr and "cannot import mypkg.nets" in res.stderr
    assert "path/to/nets.py:MyNet" in res.stderr  # says how to name the file instead
    env["PYTHONPATH"] += os.pathsep + str(pkg)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_teachers_without_batchnorm_get_a_warning_from_register_and_verify(tmp_path, monkeypatch, capsys):
    pkg = user_package(tmp_path / "src")
    monkeypatch.syspath_prepend(str(pkg))
    from mypkg.nets import MyNet

    torch.save(MyNet(3, batch_norm=False).state_dict(), tmp_path / "nobn.pth")
    zoo = str(tmp_path / "zoo")
    assert main(["register", str(tmp_path / "nobn.pth"), "--arch", "mypkg.nets:MyNet", "--arch-args",
                 '{"batch_norm": false}', "--class-ids", "a,b,c", "--image-size", "8", *NONE, "--zoo", zoo]) == 0
    warning = "purer-zoo: warning: nobn has no BatchNorm layer, so R_bn cannot shape its pseudo images"
    assert capsys.readouterr().err.startswith(warning)
    assert main(["verify", "--zoo", zoo]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(warning) and "1 model(s) verified" in captured.out


# ------------------------------------------------------------------------------------------ malformed input

def test_a_malformed_pth_is_one_line_without_torch_warnings(tmp_path, capsys):
    import pickle

    (tmp_path / "text.pth").write_text("not a torch file")
    (tmp_path / "protocol4.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    for name in ("text.pth", "protocol4.pth"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["register", str(tmp_path / name), "--arch", "conv4", "--class-ids", "a", "--image-size", "16",
                         *NONE, "--zoo", str(tmp_path / "zoo")]) == 2
        assert caught == []  # torch's two-line pickle-protocol warning is not shown beside purer's line
        one_line_error(capsys, f"{name}: torch.load(weights_only=True) refused it")
    assert not (tmp_path / "zoo").exists()


def resnet18_pth(tmp_path: Path) -> Path:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    return path


@pytest.mark.parametrize("case,args,fragments", [
    ("wrong keys", ["--arch", "tv:resnet34", "--image-size", "32", *NONE],
     ["weights do not fit the architecture 'tv:resnet34' (its library's own tensor names): missing 96 tensor(s), "
      "first 'layer1.2.conv1.weight'"]),
    ("wrong keys", ["--arch", "tv:mobilenet_v3_small", "--image-size", "32", *NONE],
     ["'tv:mobilenet_v3_small'", "first 'features.0.0.weight'", "unexpected tensor(s), first 'conv1.weight'"]),
    ("missing mean/std", ["--arch", "tv:resnet18", "--image-size", "32"],
     ["no mean and std, and tv:resnet18 checkpoints do not carry them", "--mean/--std", "0 and 1 for none"]),
    ("missing std", ["--arch", "tv:resnet18", "--image-size", "32", "--mean", "0.5"], ["no std"]),
    ("missing image size", ["--arch", "tv:resnet18", *NONE], ["no image size; state --image-size"]),
    ("wrong channel count", ["--arch", "tv:resnet18", "--image-size", "32", "--in-channels", "1", *NONE],
     ["its first convolution 'conv1.weight' takes 3 input channel(s), not the 1 stated"]),
    ("no arch", ["--image-size", "32", *NONE], ["no architecture given; state --arch"]),
    ("unknown arch", ["--arch", "vgg", "--image-size", "32", *NONE], ["unknown architecture 'vgg'"]),
    ("unknown torchvision model", ["--arch", "tv:resnet19", "--image-size", "32", *NONE],
     ["unknown torchvision model 'resnet19'"]),
    ("unimportable module", ["--arch", "nopkg.nets:Net", "--image-size", "32", *NONE],
     ["cannot import nopkg.nets", "path/to/nets.py:Net"]),
])
def test_each_malformed_checkpoint_is_one_line_and_registers_nothing(case, args, fragments, tmp_path, capsys):
    pth = resnet18_pth(tmp_path)
    assert main(["register", str(pth), "--class-ids", "a,b", *args, "--zoo", str(tmp_path / "zoo")]) == 2
    one_line_error(capsys, *fragments)
    assert not (tmp_path / "zoo").exists()


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def conv4_rows(tmp_path: Path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        save_file({k: v.contiguous() for k, v in tiny_model(seed=i).state_dict().items()},
                  str(tmp_path / f"m{i}.safetensors"))
        rows.append({"file": f"m{i}.safetensors", "arch": "conv4", "arch_args": '{"width": 8}',
                     "class_ids": ",".join(f"c{i}{k}" for k in range(5)), "image_size": SIZE, "mean": "0.5",
                     "std": "0.25", "dataset": "mine", "id": "", "in_channels": ""})
    return rows


def test_a_manifest_registers_every_row_and_list_shows_them(tmp_path, capsys):
    rows = conv4_rows(tmp_path, 3)
    rows[1]["id"] = "second"
    manifest = write_manifest(tmp_path / "models.csv", rows)
    zoo = str(tmp_path / "zoo")
    assert main(["register", "--manifest", str(manifest), "--zoo", zoo]) == 0
    assert capsys.readouterr().out.count("registered ") == 3
    assert main(["list", "--zoo", zoo]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[1:]] == ["m0", "second", "m2"]
    assert all("conv4" in line and "1x16" in line and "mine" in line for line in listed[1:])
    assert Zoo(zoo).config("second").class_ids == [f"c1{k}" for k in range(5)]

    yaml_manifest = tmp_path / "more.yaml"
    yaml_manifest.write_text(json.dumps({"models": [{"file": "m0.safetensors", "id": "again", "arch": "conv4",
                                                     "arch_args": {"width": 8}, "class_ids": ["x", "y", "z", "u", "v"],
                                                     "image_size": SIZE, "mean": [0.5], "std": 0.25}]}))
    assert main(["register", "--manifest", str(yaml_manifest), "--zoo", zoo]) == 0
    assert Zoo(zoo).ids() == ["m0", "second", "m2", "again"] and Zoo(zoo).verify() == []


@pytest.mark.parametrize("case,change,fragment", [
    ("missing file", {"file": "absent.safetensors"}, "models.csv row 3: weights file not found"),
    ("missing mean/std", {"mean": "", "std": ""}, "models.csv row 3: "),
    ("wrong keys", {"arch": "resnet10"}, "models.csv row 3: "),
    ("wrong channel count", {"in_channels": "3"}, "models.csv row 3: "),
    ("duplicate id", {"id": "m0"}, "models.csv row 3: id 'm0' is already the id of models.csv row 1"),
    ("bad number", {"image_size": "big"}, "models.csv row 3: image_size must be a whole number"),
    ("bad json", {"arch_args": "{width: 8}"}, "models.csv row 3: arch_args is not JSON"),
])
def test_a_bad_manifest_row_registers_nothing_and_is_named(case, change, fragment, tmp_path, capsys):
    rows = conv4_rows(tmp_path, 4)
    rows[2].update(change)
    zoo = tmp_path / "zoo"
    Zoo(zoo, create=True)  # an existing zoo stays as it was, too
    before = (zoo / "zoo.json").read_bytes()
    assert main(["register", "--manifest", str(write_manifest(tmp_path / "models.csv", rows)),
                 "--zoo", str(zoo)]) == 2
    line = one_line_error(capsys, fragment)
    if case == "missing mean/std":
        assert "no mean and std" in line
    if case == "wrong keys":
        assert "do not fit the architecture 'resnet10'" in line
    if case == "wrong channel count":
        assert "takes 1 input channel(s), not the 3 stated" in line
    assert (zoo / "zoo.json").read_bytes() == before and sorted(p.name for p in zoo.iterdir()) == ["zoo.json"]


def test_a_failed_register_into_a_folder_of_yours_leaves_it_as_it_was(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    pth = resnet18_pth(tmp_path)
    assert main(["register", str(pth), "--arch", "tv:resnet34", "--class-ids", "a,b", "--image-size", "32", *NONE,
                 "--zoo", str(tmp_path / "mine")]) == 2
    one_line_error(capsys, "do not fit the architecture 'tv:resnet34'")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_manifest_mistakes(tmp_path, capsys):
    manifest = tmp_path / "models.csv"
    manifest.write_text("file,arch,colour\nm.pt,conv4,red\n")
    assert main(["register", "--manifest", str(manifest), "--zoo", str(tmp_path / "z")]) == 2
    one_line_error(capsys, "unknown column(s) ['colour']")
    assert main(["register", "--manifest", str(manifest), "--arch", "conv4", "--zoo", str(tmp_path / "z")]) == 2
    one_line_error(capsys, "--arch describe one model; with --manifest, set them per row")
    assert main(["register", "--zoo", str(tmp_path / "z")]) == 2
    one_line_error(capsys, "give a weights file or model folder, or --manifest")
    assert main(["register", "--manifest", str(tmp_path / "none.csv"), "--zoo", str(tmp_path / "z")]) == 2
    one_line_error(capsys, "manifest not found")


# ------------------------------------------------------------------------------------------ the zoo on disk

@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_zoo_files_follow_the_umask(umask, dirs, files, tmp_path):
    from purer.zoo import ModelConfig

    old = os.umask(umask)
    try:
        zoo = Zoo(tmp_path / "zoo", create=True)
        zoo.add("m", tiny_model(), ModelConfig("conv4", 5, list("abcde"), 1, SIZE, arch_args={"width": 8}))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(zoo.path) == dirs and mode(zoo.path / "m") == dirs
    assert {p.name: mode(p) for p in [zoo.path / "zoo.json", *(zoo.path / "m").iterdir()]} == {
        "zoo.json": files, "config.json": files, "model.safetensors": files}


def test_an_unknown_architecture_names_the_model_and_the_zoo(tmp_path):
    from purer.pipeline import RunConfig, RunError
    from purer.pipeline.build import load_zoo
    from purer.zoo import ModelConfig

    zoo = Zoo(tmp_path / "zoo", create=True)
    zoo.add("m", tiny_model(), ModelConfig("conv4", 5, list("abcde"), 1, SIZE, arch_args={"width": 8}))
    path = zoo.path / "m" / "config.json"
    path.write_text(path.read_text().replace('"conv4"', '"conv9"'))
    cfg = RunConfig()
    cfg.zoo.path, cfg.zoo.build_if_missing = str(zoo.path), False
    with pytest.raises(RunError, match=rf"model 'm' of zoo {zoo.path}: unknown architecture 'conv9'"):
        load_zoo(cfg, dist=None, progress=False)

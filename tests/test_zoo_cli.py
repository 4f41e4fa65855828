"""The ``purer-zoo`` CLI: exit codes, one-line errors, register, resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import purer.data
from purer.zoo import Zoo
from purer.zoo.cli import main
from zoo_synthetic import SIZE, interrupt_second_teacher, separable_images, tiny_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "conv4", "--arch-args", '{"width": 8}', "--in-channels", "1", "--image-size", str(SIZE), "--mean", "0",
        "--std", "1"]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("purer-zoo: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[-1], (f, err)


@pytest.fixture
def synthetic_split(monkeypatch):
    data = separable_images(num_classes=10, per_class=10)
    calls = []

    def fake_load_split(dataset, split, root=None, image_size=None):
        calls.append((dataset, split, image_size))
        return data

    monkeypatch.setattr(purer.data, "load_split", fake_load_split)
    return calls


def test_pretrain_from_spec_with_flag_overrides(tmp_path, synthetic_split, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(f"dataset: synthetic\nimage_size: {SIZE}\nnum_models: 3\nclasses_per_model: 3\nepochs: 1\narch_args: {{width: 8}}\n")
    zoo = tmp_path / "zoo"
    assert main(["pretrain", "--spec", str(spec), "--num-models", "2", "--zoo", str(zoo), "--quiet"]) == 0
    assert synthetic_split == [("synthetic", "train", SIZE)]  # meta-train split only
    assert Zoo(zoo).ids() == ["conv4-000", "conv4-001"]
    assert "held-out accuracy median" in capsys.readouterr().out

    assert main(["pretrain", "--spec", str(spec), "--zoo", str(zoo), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "conv4-000: already in" in err and "conv4-001: already in" in err
    assert Zoo(zoo).ids() == ["conv4-000", "conv4-001", "conv4-002"]
    assert main(["verify", "--zoo", str(zoo)]) == 0


def test_pretrain_mistakes(tmp_path, synthetic_split, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("num_modles: 3\n")
    assert main(["pretrain", "--spec", str(spec), "--zoo", str(tmp_path / "z")]) == 2
    one_line_error(capsys, "num_modles")
    assert main(["pretrain", "--dataset", "synthetic"]) == 2
    one_line_error(capsys, "--zoo")
    assert main(["pretrain", "--zoo", str(tmp_path / "z"), "--image-size", str(SIZE), "--num-models", "3"]) == 2
    one_line_error(capsys, "need 15 classes")
    assert main(["pretrain", "--zoo", str(tmp_path / "z"), "--arch", "vgg"]) == 2
    one_line_error(capsys, "unknown arch")
    assert main(["pretrain", "--zoo", str(tmp_path / "z"), "--subsets", "overlap"]) == 2  # argparse's own check
    assert "invalid choice" in capsys.readouterr().err


def test_register_safetensors_and_torch_state_dicts(tmp_path, capsys):
    model = tiny_model(seed=4)
    st, pt = tmp_path / "teacher.safetensors", tmp_path / "teacher.pt"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    torch.save(model.state_dict(), pt)
    zoo = str(tmp_path / "zoo")
    assert main(["register", str(st), *TINY, "--class-ids", "a,b,c,d,e", "--mean", "0.5", "--std", "0.2",
                 "--dataset", "mine", "--zoo", zoo]) == 0
    assert main(["register", str(pt), *TINY, "--class-ids", "a,b,c,d,e", "--id", "from-pt", "--zoo", zoo]) == 0
    z = Zoo(zoo)
    assert z.ids() == ["teacher", "from-pt"] and z.verify() == []
    cfg = z.config("teacher")
    assert cfg.class_ids == list("abcde") and cfg.mean == [0.5] and cfg.std == [0.2] and cfg.dataset == "mine"
    x = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(z.load_teacher("from-pt").model(x), model(x))

    assert main(["register", str(pt), *TINY, "--class-ids", "a,b,c,d,e", "--zoo", zoo]) == 2
    one_line_error(capsys, "already in zoo", "--id")


def test_register_rejects_what_does_not_fit(tmp_path, capsys):
    model = tiny_model()
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    zoo = str(tmp_path / "zoo")
    assert main(["register", str(pt), *TINY, "--class-ids", "a,b,c", "--zoo", zoo]) == 2
    one_line_error(capsys, "'head.weight'", "[5, 8]", "[3, 8]")
    assert not Path(zoo).exists()  # a rejected register leaves nothing behind

    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": model.state_dict()}, nested)
    assert main(["register", str(nested), *TINY, "--class-ids", "a,b,c,d,e", "--zoo", zoo]) == 2
    one_line_error(capsys, "['state_dict']", "model.state_dict()")

    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    assert main(["register", str(pickled), *TINY, "--class-ids", "a,b,c,d,e", "--zoo", zoo]) == 2
    one_line_error(capsys, "weights_only=True")

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["register", str(broken), *TINY, "--class-ids", "a,b,c,d,e", "--zoo", zoo]) == 2
    one_line_error(capsys, "broken.safetensors")

    odd = tmp_path / "-odd name.pt"
    torch.save(model.state_dict(), odd)
    assert main(["register", str(odd), *TINY, "--class-ids", "a,b,c,d,e", "--zoo", zoo]) == 2
    one_line_error(capsys, "invalid model id '-odd name'", "pass --id")

    assert main(["register", str(tmp_path / "absent.pt"), *TINY, "--class-ids", "a", "--zoo", zoo]) == 2
    one_line_error(capsys, "absent.pt")
    assert main(["register", str(pt), "--arch", "conv4", "--arch-args", "[1]", "--class-ids", "a", "--zoo", zoo]) == 2


def test_list_inspect_verify_remove(tmp_path, capsys):
    model = tiny_model()
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    zoo = str(tmp_path / "zoo")
    for i in range(2):
        assert main(["register", str(pt), *TINY, "--class-ids", "a,b,c,d,e", "--id", f"m{i}", "--zoo", zoo]) == 0
    capsys.readouterr()

    assert main(["list", "--zoo", zoo]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("m0 ") and out[2].startswith("m1 ")
    assert main(["list", "--json", "--zoo", zoo]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == ["m0", "m1"]
    assert main(["inspect", "m1", "--zoo", zoo]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["id"] == "m1" and info["class_ids"] == list("abcde") and len(info["sha256"]) == 64
    assert main(["inspect", "m9", "--zoo", zoo]) == 2
    one_line_error(capsys, "no model 'm9'")

    weights = Path(zoo) / "m1" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-2] ^= 0x40
    weights.write_bytes(bytes(raw))
    assert main(["verify", "--zoo", zoo]) == 1
    err = capsys.readouterr().err
    assert "m1:" in err and "sha256" in err and "m0:" not in err

    assert main(["remove", "m1", "--zoo", zoo]) == 0
    assert main(["verify", "--zoo", zoo]) == 0
    assert main(["remove", "m1", "--zoo", zoo]) == 2
    one_line_error(capsys, "no model 'm1'")
    assert main(["list", "--zoo", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, "no model zoo at")


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "purer.zoo", "verify", "--zoo", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"purer-zoo: error: no model zoo at {tmp_path / 'nowhere'} (expected {tmp_path / 'nowhere' / 'zoo.json'}); "
        "build one with `purer-zoo pretrain` or `purer-zoo register`"]


def test_interrupted_pretrain_exits_130_and_resumes(tmp_path, synthetic_split, monkeypatch, capsys):
    interrupt_second_teacher(monkeypatch)
    argv = ["pretrain", "--num-models", "2", "--epochs", "1", "--image-size", str(SIZE), "--arch-args",
            '{"width": 8}', "--zoo", str(tmp_path / "zoo"), "--quiet"]
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert Zoo(tmp_path / "zoo").ids() == ["conv4-000"]
    assert main(argv) == 0
    assert "conv4-000: already in" in capsys.readouterr().err
    assert main(["verify", "--zoo", str(tmp_path / "zoo")]) == 0


def test_inspect_prints_class_ids_as_they_are_and_ends_quietly_in_a_closed_pipe(tmp_path, capsys):
    weights = tmp_path / "cyr.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(seed=2).state_dict().items()}, str(weights))
    zoo = str(tmp_path / "zoo")
    assert main(["register", str(weights), *TINY, "--class-ids", "К,Л,М,Н,П", "--zoo", zoo]) == 0
    capsys.readouterr()
    assert main(["inspect", "cyr", "--zoo", zoo]) == 0
    assert '"К"' in capsys.readouterr().out  # not "\u041a"
    # `purer-zoo inspect ... | head` : the reader is gone before the command writes
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "purer.zoo", "inspect", "cyr", "--zoo", zoo], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == ""

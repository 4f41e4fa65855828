"""The on-disk zoo: round trip, manifest, integrity checks and clear errors."""
import json

import pytest
import torch

from purer.zoo import ModelConfig, Teacher, Zoo
from purer.zoo import store
from zoo_synthetic import SIZE, tiny_model, while_another_process_writes


def tiny_config(num_classes=5, **kw):
    return ModelConfig("conv4", num_classes, [f"k{i}" for i in range(num_classes)], in_channels=1, image_size=SIZE,
                       mean=[0.5], std=[0.25], dataset="synthetic", arch_args={"width": 8}, **kw)


@pytest.fixture
def zoo(tmp_path):
    z = Zoo(tmp_path / "zoo", create=True)
    z.add("conv4-000", tiny_model(seed=0), tiny_config(metrics={"heldout_acc": 0.9}))
    z.add("conv4-001", tiny_model(seed=1), tiny_config())
    return z


def test_round_trip_gives_identical_logits(tmp_path):
    model, cfg = tiny_model(seed=3), tiny_config()
    z = Zoo(tmp_path / "new" / "zoo", create=True)
    written = z.add("m", model, cfg)
    teacher = Zoo(tmp_path / "new" / "zoo").load_teacher("m")
    x = torch.rand(4, 1, SIZE, SIZE)
    expected = Teacher(model, cfg)(x)
    assert isinstance(teacher, Teacher) and teacher.model_id == "m"
    assert torch.equal(teacher(x), expected)
    assert written.sha256 == store.sha256_file(z.path / "m" / "model.safetensors")
    assert z.config("m") == written


def test_manifest_lists_models(zoo):
    data = json.loads((zoo.path / "zoo.json").read_text())
    assert data["format_version"] == 1
    assert [m["id"] for m in data["models"]] == ["conv4-000", "conv4-001"]
    first = data["models"][0]
    assert first["arch"] == "conv4" and first["class_ids"] == ["k0", "k1", "k2", "k3", "k4"]
    assert first["dataset"] == "synthetic" and first["heldout_acc"] == 0.9
    assert len(zoo.load_teachers()) == 2 and [t.model_id for t in zoo.load_teachers(["conv4-001"])] == ["conv4-001"]
    assert zoo.verify() == []


def test_missing_zoo_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="zoo.json"):
        Zoo(tmp_path / "nothing")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty and holds no zoo.json"):
        Zoo(tmp_path / "photos", create=True)
    (tmp_path / "empty").mkdir()
    assert Zoo(tmp_path / "empty", create=True).ids() == []


def test_duplicate_and_invalid_ids(zoo):
    with pytest.raises(ValueError, match="already in zoo"):
        zoo.add("conv4-000", tiny_model(), tiny_config())
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="invalid model id"):
            zoo.add(bad, tiny_model(), tiny_config())
    with pytest.raises(KeyError, match="no model 'nope'"):
        zoo.config("nope")


def test_add_rejects_weights_that_do_not_fit_the_config(zoo):
    with pytest.raises(ValueError, match=r"'head.weight' has shape \[5, 8\].*expects \[3, 8\]"):
        zoo.add("bad", tiny_model(num_classes=5), tiny_config(num_classes=3))
    assert zoo.ids() == ["conv4-000", "conv4-001"]


def test_verify_catches_a_flipped_byte(zoo):
    path = zoo.path / "conv4-001" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))
    problems = zoo.verify()
    assert len(problems) == 1 and problems[0].startswith("conv4-001:") and "sha256" in problems[0]
    with pytest.raises(ValueError, match="sha256"):
        zoo.load_teacher("conv4-001")
    zoo.load_teacher("conv4-000")


def test_truncated_weights_name_the_file(zoo):
    path = zoo.path / "conv4-000" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        zoo.load_model("conv4-000", check_sha256=False)
    problems = zoo.verify()
    assert len(problems) == 1 and problems[0].startswith("conv4-000:")


def test_bad_config_json_names_the_file(zoo):
    (zoo.path / "conv4-000" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"conv4-000/config.json: invalid JSON"):
        zoo.load_teacher("conv4-000")
    assert zoo.verify()[0].startswith("conv4-000:")


def test_wrong_arch_names_the_tensor(zoo):
    path = zoo.path / "conv4-000" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["arch_args"] = {"width": 16}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'encoder.0.0.weight' has shape \[8, 1, 3, 3\].*\[16, 1, 3, 3\]"):
        zoo.load_teacher("conv4-000")
    cfg["arch"] = "resnet10"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the architecture"):
        zoo.load_teacher("conv4-000")


def test_missing_files_are_named(zoo):
    (zoo.path / "conv4-000" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="conv4-000/model.safetensors"):
        zoo.load_teacher("conv4-000")
    store.shutil.rmtree(zoo.path / "conv4-001")
    with pytest.raises(FileNotFoundError, match="conv4-001/config.json"):
        zoo.load_teacher("conv4-001")
    problems = zoo.verify()
    assert [p.split(":")[0] for p in problems] == ["conv4-000", "conv4-001"]


def test_bad_manifest(zoo):
    (zoo.path / "zoo.json").write_text('{"format_version": 1, "models": [')
    with pytest.raises(ValueError, match="zoo.json: invalid JSON"):
        zoo.ids()
    assert "zoo.json" in zoo.verify()[0]
    (zoo.path / "zoo.json").write_text('{"format_version": 7, "models": []}')
    with pytest.raises(ValueError, match="format_version 7"):
        zoo.ids()


def test_remove_and_unlisted_directories(zoo):
    zoo.remove("conv4-000")
    assert zoo.ids() == ["conv4-001"] and not (zoo.path / "conv4-000").exists()
    with pytest.raises(KeyError):
        zoo.remove("conv4-000")
    (zoo.path / "stray").mkdir()
    problems = zoo.verify()
    assert len(problems) == 1 and problems[0].startswith("stray:") and "not listed" in problems[0]


def test_interrupted_add_leaves_the_zoo_as_it_was(zoo, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    before = sorted(p.name for p in zoo.path.iterdir())
    monkeypatch.setattr(store, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        zoo.add("conv4-002", tiny_model(), tiny_config())
    assert sorted(p.name for p in zoo.path.iterdir()) == before
    assert zoo.ids() == ["conv4-000", "conv4-001"] and zoo.verify() == []


def test_add_replaces_a_directory_left_before_the_manifest_write(zoo):
    (zoo.path / "conv4-002").mkdir()
    (zoo.path / "conv4-002" / "junk").write_text("half")
    zoo.add("conv4-002", tiny_model(seed=2), tiny_config())
    assert not (zoo.path / "conv4-002" / "junk").exists() and zoo.verify() == []


def test_a_second_writer_waits_and_loses_nothing(zoo):
    # Without the lock this process would read the manifest, the other would add a model, and this
    # process's write would drop it.
    def add_after_reading(on_wait):
        with zoo.writing(on_wait=on_wait):
            before = zoo.ids()  # read inside the block: the other process's model is there
            zoo.add("conv4-003", tiny_model(seed=3), tiny_config())  # nested: shares this block's lock
            return before

    then = ("from zoo_synthetic import tiny_model\nfrom test_zoo_store import tiny_config\n"
            "zoo.add('conv4-002', tiny_model(seed=2), tiny_config())")
    waited, before = while_another_process_writes(zoo.path, then, add_after_reading)
    assert len(waited) == 1 and "being written by another process" in waited[0]
    assert before == ["conv4-000", "conv4-001", "conv4-002"]
    assert zoo.ids() == ["conv4-000", "conv4-001", "conv4-002", "conv4-003"] and zoo.verify() == []


def test_describe(zoo):
    d = zoo.describe("conv4-000")
    model = tiny_model()
    assert d["id"] == "conv4-000" and d["arch"] == "conv4"
    assert d["tensor_elements"] == sum(v.numel() for v in model.state_dict().values())


def test_default_zoo_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("PURER_ZOO_ROOT", raising=False)
    assert store.default_zoo_dir("glyphs-conv4").parts[-3:] == ("model_zoo", "zoos", "glyphs-conv4")
    monkeypatch.setenv("PURER_ZOO_ROOT", str(tmp_path))
    assert store.default_zoo_dir("x") == tmp_path / "x"

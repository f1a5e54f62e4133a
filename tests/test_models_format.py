"""The safe model format: round trip, cache, sha256, clear errors, and refusal of code/pickles."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from emcore.models import ModelConfig, ModelLoadError, UntrustedModelError, load_model, save_model
from emcore.models.encoder import EncoderUNet
from emcore.models.registry import UnknownModelError


def _config(**kwargs: object) -> ModelConfig:
    base = dict(
        name="tiny",
        architecture="unet_encoder",
        kwargs={"channels": 4, "levels": 2},
        resolution_nm=(16.0, 64.0),
        normalization="tissue mean 0 / std 1, 0 = no data",
        input_channels=1,
        output_channels=1,
        weights="",
        provenance={"command": "test", "steps": 0},
    )
    base.update(kwargs)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, EncoderUNet]:
    torch.manual_seed(0)
    net = EncoderUNet(channels=4, levels=2)
    return save_model(net, _config(), tmp_path / "models"), net


def test_round_trip_gives_the_same_network_and_config(saved: tuple[Path, EncoderUNet]) -> None:
    path, net = saved
    model = load_model(path)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(model(x), net(x))
    assert model.config.kwargs == {"channels": 4, "levels": 2}
    assert model.config.resolution_nm == (16.0, 64.0)
    assert model.config.weights == "tiny.safetensors"
    assert len(model.config.weights_sha256 or "") == 64
    assert not model.network.training


def test_directory_with_model_json_loads(tmp_path: Path, saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    folder = tmp_path / "folder"
    folder.mkdir()
    config = json.loads(path.read_text())
    (folder / "model.json").write_text(json.dumps(config))
    (folder / config["weights"]).write_bytes((path.parent / config["weights"]).read_bytes())
    assert load_model(folder).config.name == "tiny"


def test_url_is_downloaded_into_the_cache_and_used_from_there(
    tmp_path: Path, saved: tuple[Path, EncoderUNet], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, net = saved
    monkeypatch.setenv("SECTIONFLOW_CACHE", str(tmp_path / "cache"))
    model = load_model(f"file://{path}")
    cached = list((tmp_path / "cache" / "models").rglob("tiny.safetensors"))
    assert len(cached) == 1
    # The cached copy serves later loads even when the source is gone.
    (path.parent / "tiny.safetensors").unlink()
    again = load_model(f"file://{path}")
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(again(x), model(x))
    assert torch.equal(again(x), net(x))


def test_corrupted_cache_entry_is_downloaded_again(
    tmp_path: Path, saved: tuple[Path, EncoderUNet], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = saved
    monkeypatch.setenv("SECTIONFLOW_CACHE", str(tmp_path / "cache"))
    load_model(f"file://{path}")
    (cached,) = (tmp_path / "cache" / "models").rglob("tiny.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])
    load_model(f"file://{path}")  # sha256 mismatch in the cache -> fetched again
    assert cached.read_bytes() == (path.parent / "tiny.safetensors").read_bytes()


def test_wrong_sha256_is_refused(saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors has sha256"):
        load_model(path, sha256="0" * 64)


def test_truncated_weights_are_named_in_the_error(saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    weights = path.parent / "tiny.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors.*corrupt, truncated"):
        load_model(path)
    # Without a sha256 in the config, safetensors itself rejects the file.
    config = json.loads(path.read_text())
    config["weights_sha256"] = None
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors is not a valid safetensors file"):
        load_model(path)


def test_garbage_weights_are_refused(saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    (path.parent / "tiny.safetensors").write_bytes(b"\x00garbage" * 20)
    config = json.loads(path.read_text())
    config["weights_sha256"] = None
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_model(path)


def test_weights_of_another_shape_are_refused(saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    config = json.loads(path.read_text())
    config["kwargs"] = {"channels": 8, "levels": 2}
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors does not fit architecture 'unet_encoder'"):
        load_model(path)


def test_unknown_architecture_and_bad_config_are_refused(saved: tuple[Path, EncoderUNet]) -> None:
    path, _ = saved
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architecture": "os.system"}))
    with pytest.raises(ModelLoadError, match="unknown architecture 'os.system'"):
        load_model(path)
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "kwargs"}))
    with pytest.raises(ModelLoadError, match=r"missing keys \['kwargs'\]"):
        load_model(path)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="tiny.json is not valid JSON"):
        load_model(path)


def test_save_refuses_a_config_that_does_not_match_the_network(tmp_path: Path) -> None:
    net = EncoderUNet(channels=4, levels=2)
    bad = dataclasses.replace(_config(), kwargs={"channels": 4, "levels": 3})
    with pytest.raises(ValueError, match="do not match architecture"):
        save_model(net, bad, tmp_path)
    assert not list(tmp_path.iterdir())


class _WritesAFile:
    """Unpickling this creates ``marker`` (as a malicious pickle could run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(pickle.dumps(_WritesAFile(marker)))
    for location in (checkpoint, f"file://{checkpoint}"):
        with pytest.raises(UntrustedModelError, match="trust_remote_code=True"):
            load_model(location, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    # The file really is malicious: opting in runs it (then fails, as it holds no network).
    with pytest.raises(ModelLoadError):
        load_model(checkpoint, trust_remote_code=True)
    assert marker.exists()


def test_modelhouse_create_py_is_refused_and_not_imported(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "corgie_model"
    folder.mkdir()
    (folder / "create.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "import torch\n"
        "def create():\n"
        "    return torch.nn.Conv2d(1, 1, 3, padding=1)\n"
    )
    torch.save(torch.nn.Conv2d(1, 1, 3, padding=1).state_dict(), folder / "model.chkpt")
    for location in (folder, f"file://{folder}"):
        with pytest.raises(UntrustedModelError, match="create.py.*trust_remote_code=True"):
            load_model(location, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    model = load_model(folder, trust_remote_code=True)
    assert marker.exists()
    assert model(torch.ones(1, 1, 4, 4)).shape == (1, 1, 4, 4)


def test_unknown_name_and_empty_folder_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="shipped models are"):
        from emcore.models.registry import shipped_config_path

        shipped_config_path("encoder_1nm")
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model(tmp_path)


def test_the_same_weights_always_get_the_same_bytes_and_sha256(tmp_path: Path) -> None:
    # safetensors writes its metadata from a hash map (key order varies between saves); the
    # shipped sha256s are only reproducible by a training command if the bytes are.
    torch.manual_seed(0)
    net = EncoderUNet(channels=4, levels=2)
    files = {(save_model(net, _config(), tmp_path / str(i)).parent / "tiny.safetensors").read_bytes()
             for i in range(8)}  # fmt: skip
    assert len(files) == 1
    data = files.pop()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])

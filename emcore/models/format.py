"""The safe model format: a JSON config plus safetensors weights; loading, caching, saving.

On disk
-------
A model is two files side by side:

* ``<name>.json`` - a :class:`ModelConfig`: architecture name + kwargs (one of
  :data:`emcore.models.architectures.ARCHITECTURE_NAMES`), the input resolution range in nm/px,
  the normalization the inputs must have, input/output channels, the weights file name and its
  sha256, and training provenance (command, data, steps, final losses, code version).
* ``<name>.safetensors`` - the parameters (float32 tensors; no code, nothing to unpickle).

Loading never imports code or unpickles anything unless the caller passes
``trust_remote_code=True``: a corgie/modelhouse-style directory (``create.py`` + a pickled
checkpoint) or a pickle file (``.pt``, ``.pth``, ``.pkl``, ``.ckpt``, ``.chkpt``, ``.bin``) is
refused with :class:`UntrustedModelError` by default, before anything is read from it.

Locations
---------
``load_model`` accepts a shipped model name (:mod:`emcore.models.registry`), a local path, or any
URL cloud-files reads (``file://``, ``gs://``, ``s3://``, ``https://``) - to a ``.json`` config or
to a directory holding ``model.json``. Files behind a URL are downloaded once into the cache
(``$SECTIONFLOW_CACHE/models`` or ``~/.cache/sectionflow/models``), written atomically, and
verified against the sha256 in the config (and the caller's ``sha256=``, if given) on every load.

API summary
-----------
* ``ModelConfig`` (frozen dataclass) with ``to_json()`` / ``from_json(text, source)``.
* ``Model(config, network, source)``: ``model(x)`` runs the network.
* ``load_model(location, *, sha256=None, trust_remote_code=False, cache_dir=None, refresh=False)``.
* ``save_model(network, config, directory) -> Path`` (the config path; fills in the weights name
  and sha256).
* ``sha256_file(path) -> str``, ``cache_root() -> Path``.
* Errors: :class:`ModelLoadError` (bad, corrupt, truncated or mismatched files; names the file),
  :class:`UntrustedModelError` (code or pickle without ``trust_remote_code=True``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from emcore.errors import SectionflowError
from emcore.models import registry
from emcore.models.architectures import build

__all__ = [
    "FORMAT_VERSION",
    "PICKLE_SUFFIXES",
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "UntrustedModelError",
    "cache_root",
    "load_model",
    "save_model",
    "sha256_file",
]

FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".chkpt", ".bin")
DIRECTORY_CONFIG = "model.json"
_REMOTE_CODE_FILE = "create.py"
_REMOTE_CHECKPOINTS = ("model.chkpt", "chkpt.pt", "model.pt", "model.pth", "checkpoint.pt")


class ModelLoadError(SectionflowError, ValueError):
    """A model that cannot be loaded: missing, corrupt, truncated or mismatched files."""


class UntrustedModelError(ModelLoadError):
    """A model that would run code (``create.py``) or unpickle, without ``trust_remote_code=True``."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and to know what it expects.

    Attributes:
        name: the model's name (also the file stem).
        architecture: a name from ``ARCHITECTURE_NAMES``.
        kwargs: keyword arguments of that architecture (JSON values).
        resolution_nm: ``(min, max)`` input resolution in nm/px the model is meant for.
        normalization: what the input must be, in words (e.g. per-section tissue mean 0 / std 1,
            0 = no data).
        input_channels, output_channels: channels of the ``(N, C, H, W)`` input / output.
        weights: the safetensors file name, relative to the config's folder.
        weights_sha256: hex sha256 of the weights file (``None`` = not checked).
        provenance: how it was made: ``command``, ``data``, ``steps``, ``final_losses``,
            ``code_version``, ``seed``, ...
        description: one line for humans.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    name: str
    architecture: str
    kwargs: dict[str, Any]
    resolution_nm: tuple[float, float]
    normalization: str
    input_channels: int
    output_channels: int
    weights: str
    weights_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["resolution_nm"] = list(self.resolution_nm)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<config>") -> ModelConfig:
        """Parse a config; :class:`ModelLoadError` naming ``source`` if it is not a valid one."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"model config {source} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"model config {source} must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing, unknown = sorted(required - data.keys()), sorted(data.keys() - names)
        if missing or unknown:
            raise ModelLoadError(
                f"model config {source} is not a sectionflow model config: "
                f"missing keys {missing}, unknown keys {unknown}"
            )
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ModelLoadError(
                f"model config {source} has format_version {version}; this sectionflow reads "
                f"{FORMAT_VERSION} (upgrade sectionflow)"
            )
        try:
            lo, hi = (float(v) for v in data["resolution_nm"])
        except (TypeError, ValueError):
            raise ModelLoadError(
                f"model config {source}: resolution_nm must be [min, max] nm/px, "
                f"got {data['resolution_nm']!r}"
            ) from None
        if not isinstance(data["kwargs"], dict):
            raise ModelLoadError(f"model config {source}: kwargs must be an object, got {data['kwargs']!r}")
        weights = data["weights"]
        if not isinstance(weights, str) or "/" in weights or "\\" in weights or weights.startswith("."):
            raise ModelLoadError(
                f"model config {source}: weights must be a plain file name next to the config, "
                f"got {weights!r}"
            )
        data["resolution_nm"] = (lo, hi)
        return cls(**data)


@dataclass
class Model:
    """A loaded model: its config, the network (in eval mode) and where it came from."""

    config: ModelConfig
    network: nn.Module
    source: str

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the network (an encoder takes one image batch, the aligner ``(src, tgt)``)."""
        return self.network(*inputs)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """``$SECTIONFLOW_CACHE`` or ``~/.cache/sectionflow`` (models go in its ``models/``)."""
    env = os.environ.get("SECTIONFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sectionflow"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_url(location: str) -> bool:
    return "://" in location


def _split(location: str) -> tuple[str, str]:
    """``(folder, file name)`` of a path or URL."""
    location = location.rstrip("/")
    head, _, tail = location.rpartition("/")
    return head, tail


class _Source:
    """A folder (local path or URL) files are read from, with the download cache for URLs."""

    def __init__(self, folder: str, cache_dir: Path | None, refresh: bool) -> None:
        self.folder = folder
        self.refresh = refresh
        if _is_url(folder):
            key = hashlib.sha256(folder.encode()).hexdigest()[:24]
            self.cache = (cache_dir or cache_root()) / "models" / key
        else:
            self.cache = None

    def describe(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def exists(self, name: str) -> bool:
        if self.cache is None:
            return Path(self.folder, name).is_file()
        if (self.cache / name).is_file() and not self.refresh:
            return True
        from cloudfiles import CloudFiles

        try:
            return bool(CloudFiles(self.folder).exists(name))
        except Exception as err:  # cloud-files raises many kinds (auth, protocol, network)
            raise ModelLoadError(f"cannot reach {self.describe(name)}: {err}") from None

    def local(self, name: str, sha256: str | None = None) -> Path:
        """A local file with ``name``'s bytes (downloaded into the cache for URLs)."""
        if self.cache is None:
            path = Path(self.folder, name)
            if not path.is_file():
                raise ModelLoadError(f"model file {path} does not exist")
            return path
        path = self.cache / name
        if path.is_file() and not self.refresh and (sha256 is None or sha256_file(path) == sha256):
            return path
        from cloudfiles import CloudFiles

        try:
            data = CloudFiles(self.folder).get(name)
        except Exception as err:
            raise ModelLoadError(f"cannot download {self.describe(name)}: {err}") from None
        if data is None:
            raise ModelLoadError(f"model file {self.describe(name)} does not exist")
        _write_atomic(path, data)
        return path


def _check_sha(path: Path, expected: str | None, shown: str, what: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ModelLoadError(
            f"{what} {shown} has sha256 {actual} but {expected} was expected: the file is corrupt, "
            "truncated, or not the one the config was written for (re-download or re-save it)"
        )


def load_model(
    location: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    map_location: str | torch.device = "cpu",
) -> Model:
    """Load a model from a shipped name, a local path or a cloud-files URL.

    Args:
        location: a shipped model name (``"encoder_16_64nm"``), a ``.json`` config path/URL, a
            folder holding ``model.json``, or - only with ``trust_remote_code`` - a
            corgie/modelhouse folder (``create.py`` + checkpoint) or a pickle file.
        sha256: expected hex sha256 of the weights file (checked in addition to the config's).
        trust_remote_code: allow importing ``create.py`` and unpickling checkpoints. Only for
            files you trust: both run arbitrary code.
        cache_dir: cache root for downloads (default :func:`cache_root`).
        refresh: download again even if the cache has the files.
        map_location: device for the parameters.

    Returns:
        :class:`Model` with the network in eval mode.

    Raises:
        UntrustedModelError: the location holds code or pickles and ``trust_remote_code`` is False.
        ModelLoadError: missing, corrupt, truncated or mismatched files (the message names them).
    """
    location = os.fspath(location)
    cache = Path(cache_dir) if cache_dir is not None else None
    if location in registry.SHIPPED_MODELS and not Path(location).exists():
        location = str(registry.shipped_config_path(location))
    if not _is_url(location):
        location = str(Path(location).expanduser())

    folder, name = _split(location)
    lowered = name.lower()
    if lowered.endswith(".json"):
        return _load_safe(_Source(folder, cache, refresh), name, sha256, map_location)
    if lowered.endswith(PICKLE_SUFFIXES):
        if not trust_remote_code:
            raise UntrustedModelError(
                f"{location} is a pickle file; unpickling runs arbitrary code, so sectionflow refuses it "
                "by default. Convert it to a .json config + .safetensors weights (save_model), or pass "
                "trust_remote_code=True if you trust its author"
            )
        source = _Source(folder, cache, refresh)
        return _load_pickle(source, name, sha256, map_location)

    # A folder: the safe format first, then (opt-in) corgie/modelhouse-style code.
    source = _Source(location, cache, refresh)
    if source.exists(DIRECTORY_CONFIG):
        return _load_safe(source, DIRECTORY_CONFIG, sha256, map_location)
    if source.exists(_REMOTE_CODE_FILE):
        if not trust_remote_code:
            raise UntrustedModelError(
                f"{location} is a corgie/modelhouse-style model ({_REMOTE_CODE_FILE} + pickled checkpoint): "
                "loading it would import and run its code, so sectionflow refuses it by default. Pass "
                "trust_remote_code=True only if you trust its author, or convert it to a .json config + "
                ".safetensors weights (save_model)"
            )
        return _load_remote_code(source, sha256, map_location)
    raise ModelLoadError(
        f"no model at {location}: expected a shipped model name ({', '.join(registry.SHIPPED_MODELS)}), "
        f"a .json config, or a folder holding {DIRECTORY_CONFIG}"
    )


def _load_safe(source: _Source, config_name: str, sha256: str | None, map_location: Any) -> Model:
    config_path = source.local(config_name)
    shown_config = source.describe(config_name)
    config = ModelConfig.from_json(config_path.read_bytes(), shown_config)
    expected = config.weights_sha256
    weights_path = source.local(config.weights, expected)
    shown = source.describe(config.weights)
    _check_sha(weights_path, expected, shown, "weights file")
    _check_sha(weights_path, sha256, shown, "weights file")
    try:
        state = load_safetensors_bytes(weights_path.read_bytes())
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise ModelLoadError(
            f"weights file {shown} is not a valid safetensors file ({err}): corrupt or truncated; "
            "re-download or re-save it"
        ) from None
    try:
        network = build(config.architecture, config.kwargs)
    except ValueError as err:
        raise ModelLoadError(f"model config {shown_config}: {err}") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"weights file {shown} does not fit architecture {config.architecture!r} with kwargs "
            f"{config.kwargs} from {shown_config} (wrong architecture or shapes): {err}"
        ) from None
    network.to(map_location).eval()
    return Model(config=config, network=network, source=shown_config)


def _load_pickle(source: _Source, name: str, sha256: str | None, map_location: Any) -> Model:
    path = source.local(name, sha256)
    _check_sha(path, sha256, source.describe(name), "checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # anything can happen while unpickling
        raise ModelLoadError(f"cannot unpickle {source.describe(name)}: {err}") from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{source.describe(name)} holds a {type(obj).__name__}, not a whole nn.Module: a state dict "
            "needs its architecture - write a .json config for it and use save_model"
        )
    return Model(config=_untrusted_config(name), network=obj.eval(), source=source.describe(name))


def _load_remote_code(source: _Source, sha256: str | None, map_location: Any) -> Model:
    code_path = source.local(_REMOTE_CODE_FILE)
    spec = importlib.util.spec_from_file_location(f"_sectionflow_remote_{id(source)}", code_path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {source.describe(_REMOTE_CODE_FILE)}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    create = getattr(module, "create", None)
    if not callable(create):
        raise ModelLoadError(f"{source.describe(_REMOTE_CODE_FILE)} defines no create() function")
    network = create()
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"create() in {source.describe(_REMOTE_CODE_FILE)} returned no nn.Module")
    for name in _REMOTE_CHECKPOINTS:
        if source.exists(name):
            path = source.local(name, sha256)
            _check_sha(path, sha256, source.describe(name), "checkpoint")
            state = torch.load(path, map_location=map_location, weights_only=False)
            network.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            break
    return Model(config=_untrusted_config(source.folder), network=network.eval(), source=source.folder)


def _untrusted_config(name: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        architecture="remote_code",
        kwargs={},
        resolution_nm=(0.0, float("inf")),
        normalization="unknown (loaded with trust_remote_code)",
        input_channels=1,
        output_channels=1,
        weights=name.rsplit("/", 1)[-1],
        provenance={"loaded_with": "trust_remote_code=True"},
    )


def _sorted_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a hash map, so two saves of the same tensors can order
    its keys differently and the same weights get two sha256s. The header keeps its length (the
    same keys and values, its padding), so the tensor offsets do not move.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:
        raise AssertionError("re-serialized safetensors header grew; the format changed")
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def save_model(network: nn.Module, config: ModelConfig, directory: str | os.PathLike[str]) -> Path:
    """Write ``<config.name>.safetensors`` and ``<config.name>.json`` into ``directory``.

    The config's ``weights`` and ``weights_sha256`` are filled in. Before writing, the state dict is
    checked to load into a fresh ``config.architecture(**config.kwargs)``, so a saved config always
    matches its weights. Both files are written atomically (never half a file).

    Returns:
        The config path.
    """
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    try:
        build(config.architecture, config.kwargs).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"network parameters do not match architecture {config.architecture!r} with kwargs "
            f"{config.kwargs}: {err}"
        ) from None
    directory = Path(directory)
    metadata = {"format_version": str(FORMAT_VERSION), "name": config.name}
    data = _sorted_header(save_safetensors_bytes(state, metadata=metadata))
    weights_name = f"{config.name}.safetensors"
    config = dataclasses.replace(
        config, weights=weights_name, weights_sha256=hashlib.sha256(data).hexdigest()
    )
    _write_atomic(directory / weights_name, data)
    config_path = directory / f"{config.name}.json"
    _write_atomic(config_path, config.to_json().encode())
    return config_path

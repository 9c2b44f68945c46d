"""Defines exported models: a run's weights as safetensors, and :func:`load_model` to rebuild them.

``ml export`` (:mod:`ml.tools.export`) writes two files from a checkpoint: ``model.safetensors``,
the model's weights (tensors only, no pickle: any program can read it without running code) with
metadata naming the format, the ``ml`` version, the step and the model's config; and
``model.yaml`` beside it, the run's whole resolved config. :func:`load_model` builds the model
from that config's ``model`` section through the registry, as ``ml train`` does, and loads the
weights into it.

Heavy libraries (torch, safetensors) are imported inside the functions, so ``import ml`` stays cheap.
"""

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ml.errors import ModelFileError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "EXPORT_FORMAT",
    "ExportedModel",
    "ModelFileError",
    "StreamedWeights",
    "config_path_beside",
    "export_weights",
    "load_model",
    "read_weights",
    "weights_for_safetensors",
]

EXPORT_FORMAT = 1
SUFFIX = ".safetensors"
# Keys of the safetensors metadata (a str -> str mapping in the file's header).
META_FORMAT = "ml.format_version"
META_VERSION = "ml.version"
META_STEP = "ml.step"
META_MODEL_CONFIG = "ml.model_config"  # the `model` section, JSON
META_CONFIG = "ml.config"  # the whole resolved config, YAML (when model.yaml beside is missing)
META_CHECKPOINT = "ml.checkpoint"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ExportedModel:
    """What :func:`export_weights` wrote."""

    weights_path: Path
    config_path: Path
    step: int
    num_tensors: int


def config_path_beside(weights_path: str | Path) -> Path:
    """The config YAML written beside an exported model: ``model.safetensors`` -> ``model.yaml``."""
    return Path(weights_path).with_suffix(".yaml")


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Removes a ``module.``/``_orig_mod.`` prefix that every key carries (a DDP or compile wrapper's).

    Only a prefix shared by all keys is removed: a model may have a submodule named ``module``.
    """
    keys = list(state)
    while keys:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        keys = [k[len(prefix) :] for k in keys]
    return dict(zip(keys, state.values(), strict=True))


def weights_for_safetensors(model_state: Mapping[str, Any]) -> "dict[str, torch.Tensor]":
    """The model's tensors as safetensors can store them: on the CPU, contiguous, each its own memory.

    Tied weights (two names, one tensor) and views share memory, which safetensors refuses to
    write: each name gets its own copy, so the file loads back with ``load_state_dict(strict=True)``
    under every name the model has.

    Raises:
        ModelFileError: An entry is not a tensor (a module's ``_extra_state``, say).
    """
    import torch

    tensors = {}
    for key, value in _strip_wrapper_prefixes(model_state).items():
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(
                f"model state entry {key!r} is a {type(value).__name__}, not a tensor; "
                "safetensors holds tensors only"
            )
        tensors[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return tensors


def export_weights(
    model_state: "Mapping[str, Any] | StreamedWeights",
    config_yaml: str,
    weights_path: Path,
    *,
    step: int,
    checkpoint: str = "",
) -> ExportedModel:
    """Writes the weights as safetensors and the config YAML beside them, each atomically.

    Both files are written to temporary files first (fsynced) and renamed into place one right
    after the other, so a failure leaves the old files (if any) as they were.

    Args:
        model_state: The model's state dict (from a checkpoint's ``model`` entry), or its tensors
            one at a time (:class:`StreamedWeights`: a sharded checkpoint's, streamed into the file).
        config_yaml: The run's resolved config, YAML.
        weights_path: Where to write the weights (``.safetensors``); the config goes beside it.
        step: The training step the weights are from.
        checkpoint: The checkpoint they came from (recorded in the metadata).
    """
    import yaml
    from safetensors.torch import save

    import ml
    from ml.utils.atomic import atomic_open

    config = yaml.safe_load(config_yaml)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ModelFileError("the run's config has no `model` section to rebuild the model from")
    metadata = {
        "format": "pt",  # what other safetensors readers (transformers) look for
        META_FORMAT: str(EXPORT_FORMAT),
        META_VERSION: ml.__version__,
        META_STEP: str(step),
        META_MODEL_CONFIG: json.dumps(config["model"], sort_keys=True),
        META_CONFIG: config_yaml,
        META_CHECKPOINT: checkpoint,
    }
    config_path = config_path_beside(weights_path)
    with atomic_open(config_path, "w") as config_file:
        config_file.write(config_yaml)
        with atomic_open(weights_path, "wb") as weights_file:
            if isinstance(model_state, StreamedWeights):  # one tensor in memory at a time
                count = _write_streamed(weights_file, model_state, metadata)
            else:
                tensors = weights_for_safetensors(model_state)
                # The bytes safetensors.torch.save_file would write, written through atomic_open.
                weights_file.write(save(tensors, metadata=metadata))
                count = len(tensors)
    return ExportedModel(weights_path, config_path, step, count)


@dataclass
class StreamedWeights:
    """A model's weights read one tensor at a time (a sharded checkpoint's, which may not fit one
    process's memory at once): the dtype and shape of each, then the tensors in that order."""

    specs: "Mapping[str, tuple[torch.dtype, tuple[int, ...]]]"
    tensors: "Iterator[tuple[str, torch.Tensor]]"


_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _write_streamed(file: IO[bytes], weights: StreamedWeights, metadata: dict[str, str]) -> int:
    """Writes the safetensors format (an 8-byte header length, the JSON header, then each tensor's
    bytes in order) from the specs first and the tensors one by one; returns how many."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in weights.specs.items():
        code = _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
        if code is None:
            raise ModelFileError(f"model tensor {name!r} is {dtype}, which safetensors cannot store")
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    file.write(len(text).to_bytes(8, "little") + text)
    count = 0
    for (name, tensor), expected in zip(weights.tensors, weights.specs, strict=True):
        if name != expected:
            raise ModelFileError(f"the weights came as {name!r} where {expected!r} was due")
        file.write(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        count += 1
    return count


def _read_config(weights_path: Path, metadata: Mapping[str, str]) -> tuple[Any, str]:
    """The run config that rebuilds the model (the YAML beside, else the metadata's), and where it is from."""
    import yaml
    from omegaconf import OmegaConf

    from ml.core.compose import load_yaml
    from ml.errors import ConfigError

    beside = config_path_beside(weights_path)
    if beside.is_file():
        try:
            return load_yaml(beside), str(beside)
        except ConfigError as e:
            raise ModelFileError(str(e)) from e
    text = metadata.get(META_CONFIG)
    if not text:
        raise ModelFileError(
            f"no config to build the model from: {beside} is missing and {weights_path} "
            "has none in its metadata (export it with `ml export`)"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelFileError(f"the config in {weights_path}'s metadata is not valid YAML") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"the config in {weights_path}'s metadata is not a mapping of sections")
    return OmegaConf.create(data), f"{weights_path} (metadata)"


def _build_model(config: Any, where: str, *, trust_imports: bool) -> "nn.Module":
    """Builds the model of a run config's ``model`` section the way ``ml train`` does.

    The section is merged over the named component's config dataclass (a registered name or
    ``package.module:ClassName``), validated, and the class is constructed from it; the weights
    then get the run's weight precision (``trainer.use_double_weight_precision``).
    """
    import sys

    import torch
    from omegaconf import DictConfig

    from ml.core.compose import build_component, typed_section
    from ml.errors import ConfigError

    if not isinstance(config, DictConfig) or "model" not in config:
        raise ModelFileError(f"{where} has no `model` section")
    name = str(config.model.get("name", ""))
    module = name.partition(":")[0] if ":" in name else None
    if module and module not in sys.modules and not trust_imports:
        raise ModelFileError(
            f"{where} names the model {name}, whose module {module} is not imported: import it first "
            "(the file chooses what a load would import), or pass trust_imports=True"
        )
    try:
        node = typed_section("model", "model", config.model)
        model = build_component("model", "model", node)
    except ConfigError as e:
        raise ModelFileError(f"{where}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(f"{where}: model {node.name} is a {type(model).__name__}, not an nn.Module")
    trainer = config.get("trainer")
    double = isinstance(trainer, DictConfig) and bool(trainer.get("use_double_weight_precision", False))
    return model.to(dtype=torch.float64 if double else torch.float32)


def _mismatch(error: RuntimeError) -> str:
    """torch's load_state_dict error in one line: its first problems, not the generic header."""
    details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    if not details:
        return str(error).strip().splitlines()[0]
    return "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3 else "")


def read_weights(
    path: Path, device: "str | torch.device" = "cpu"
) -> "tuple[dict[str, torch.Tensor], dict[str, str]]":
    """The tensors of a safetensors file and its metadata (no code runs: the format holds tensors only).

    Raises:
        ModelFileError: The file is missing, foreign or damaged (one line saying why).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(path, device=str(device)), metadata
    except Exception as e:  # safetensors reports a foreign or damaged file in several ways
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path} is not a safetensors file ({reason})") from e


def load_model(
    path: str | Path,
    *,
    device: "str | torch.device | None" = None,
    strict: bool = True,
    trust_imports: bool = False,
) -> "nn.Module":
    """Rebuilds a model exported by ``ml export`` and loads its weights.

    The model is built from the ``model`` section of ``<name>.yaml`` beside the file (or, when that
    is missing, of the config in the file's metadata), exactly as ``ml train`` builds it: a
    registered name or ``package.module:ClassName``. Loading runs no code the file chooses: the
    module of an import path must be imported already (``import package.module`` first), unless
    ``trust_imports`` (a file from elsewhere could name any installed module, whose import runs it).

    Args:
        path: The ``.safetensors`` file.
        device: Where to put the model (default: the CPU).
        strict: Whether every weight must match a model parameter or buffer, and the reverse.
        trust_imports: Import the module an import path names if it is not imported yet.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: There is no such file.
        ModelFileError: The file is not safetensors, there is no config, or the config builds a
            model the weights do not fit (the message names the first mismatches).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    state, metadata = read_weights(path)
    config, where = _read_config(path, metadata)
    model = _build_model(config, where, trust_imports=trust_imports)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ModelFileError(
            f"the weights in {path} do not fit the model {config.model.get('name')} built from {where}: "
            f"{_mismatch(e)}"
        ) from e
    if device is not None:
        model.to(device)
    return model.eval()

"""Defines how a run's config is composed, validated and turned into objects.

``YAML files (merged in order) + key=value overrides`` are merged over the config dataclass of the
component each section names. Every problem (bad YAML, unknown section or key, wrong type, missing
required value, unknown component) raises :class:`ConfigError` with one line naming the key or file,
before anything is created on disk.
"""

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ml.core.config import EXP_NAME_ENV
from ml.core.registry import Kind, build, lookup
from ml.errors import ConfigError, RegistryError
from ml.utils.atomic import read_regular

# Section name -> registry kind. `logger` is a list of sections.
SECTIONS: dict[str, Kind] = {
    "model": "model",
    "task": "task",
    "optimizer": "optimizer",
    "lr_scheduler": "lr_scheduler",
    "trainer": "trainer",
    "logger": "logger",
    "launcher": "launcher",
}
DEFAULTS: dict[str, Any] = {
    "lr_scheduler": {"name": "constant"},
    "trainer": {"name": "sl"},
    "logger": [{"name": "stdout"}, {"name": "jsonl"}],
    "launcher": {"name": "single"},
}
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|not enough memory", re.IGNORECASE)
PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "examples"


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__


def find_config_file(arg: str) -> Path:
    """Maps a command-line config argument to a file: a path, or a packaged name like ``digits``.

    Raises:
        ConfigError: Neither a file nor a packaged config has that name.
    """
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    packaged = PACKAGED_CONFIGS / arg / "config.yaml"
    if "/" not in arg and not arg.endswith((".yaml", ".yml")) and packaged.is_file():
        return packaged
    names = sorted(p.parent.name for p in PACKAGED_CONFIGS.glob("*/config.yaml"))
    raise ConfigError(
        f"config file not found: {arg} (give a YAML path, or a packaged config: {', '.join(names)})"
    )


def load_yaml(path: Path) -> DictConfig:
    """Reads one YAML config file (safely: no tags, no aliases bombs); ConfigError naming the file."""
    try:
        text = read_regular(path).decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a YAML text file (not UTF-8 at byte {e.start})") from e
    try:
        data = yaml.safe_load(text)
    except RecursionError as e:
        raise ConfigError(f"{path} is nested too deeply to be a config") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"bad YAML in {where}: {problem}") from e
    _check_size(data, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (model:, task:, ...), not a {type(data).__name__}"
        )
    try:
        return OmegaConf.create(data)
    except (OmegaConfBaseException, RecursionError) as e:
        raise ConfigError(f"bad config in {path}: {_first_line(e)}") from e


MAX_CONFIG_NODES = 100_000


def _check_size(data: Any, path: Path) -> None:
    """Refuses a document whose YAML aliases expand to more values than any config has (alias bombs)."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{path} expands to more than {MAX_CONFIG_NODES} values (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: write key=value, e.g. optimizer.lr=3e-4")
        refuse_sweep_override(item)
    try:
        return OmegaConf.from_dotlist(overrides)
    # OmegaConf's key grammar fails on some keys (`[=1`) with plain Python errors.
    except (OmegaConfBaseException, yaml.YAMLError, IndexError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"bad override in {' '.join(overrides)}: {_first_line(e)}") from e


def refuse_sweep_override(item: str) -> None:
    """Refuses ``sweep.KEY=[...]`` on the command line: compose drops the ``sweep:`` section (each
    sweep point is composed as one run), so such an override would be ignored without a word.

    Raises:
        ConfigError: ``item`` sets ``sweep`` or a key in it; the line shows the ``-m`` way.
    """
    key, value = _override_key(item), item.partition("=")[2]
    if not _nested(key, "sweep"):
        return
    swept, choices = "optimizer.lr", "1e-3,3e-4"  # (an example, for a whole `sweep=...`)
    listed = value.strip().removeprefix("[").removesuffix("]")  # the list's items, as written
    if key.startswith("sweep.") and listed.strip() and not any(c in listed for c in "[]{}'\""):
        swept = key.removeprefix("sweep.")
        choices = ",".join(part.strip() for part in listed.split(","))
    raise ConfigError(
        f"{item}: a sweep is not a key=value override (it would be ignored): sweep on the command "
        f"line with -m {swept}={choices}, or in a `sweep:` section of a YAML config file"
    )


def _shape_error(
    where: str, merged: DictConfig, layer: DictConfig, overrides: list[str] | None
) -> str | None:
    """Says where ``layer`` gives a mapping for a list of ``merged`` (or a list for a mapping), with
    the value it should have written; None if the layers do not differ so.

    ``overrides`` are the layer's ``key=value`` strings when it is the command line's (the fix is
    then an override), else None (the fix is a line of the YAML file ``where``).
    """
    try:
        old_tree: Any = OmegaConf.to_container(merged, resolve=False)
        new_tree: Any = OmegaConf.to_container(layer, resolve=False)
        found = _find_misfit(old_tree, new_tree, [])
    except (OmegaConfBaseException, RecursionError):  # too deep to walk: the merge's own words then
        return None
    if found is None:
        return None
    path, old, new = found
    key = ".".join(path)
    culprit = where
    if overrides is not None:  # the overrides that reach the key, or that it is part of
        reaching = [o for o in overrides if _nested(_override_key(o), key) or _nested(key, _override_key(o))]
        culprit = " ".join(reaching) or where

    def fix(value: Any) -> str:
        flow = _flow(value)
        return shlex.quote(f"{key}={flow}") if overrides is not None else f"{key}: {flow}"

    if isinstance(old, list):
        what = _describe_list(key, old)
        if new and all(str(k).isdigit() for k in new):  # logger.0.precision=-3: into one entry of a list
            entries = list(old)
            for index, entry in sorted(((int(k), v) for k, v in new.items())):
                if index < len(entries) and isinstance(entries[index], dict) and isinstance(entry, dict):
                    entries[index] = {**entries[index], **entry}
                else:  # past the end: a new entry, which needs a component's name
                    entries.append({"name": "NAME", **entry} if isinstance(entry, dict) else entry)
            return (
                f"{culprit}: {key} is {what}, and one entry of a list cannot be set on its own: give "
                f"the whole list, {fix(entries)}"
            )
        return f"{culprit}: {key} is {what}, not a mapping: write {fix([new])}"
    first = next(iter(old), None)
    if first is None or isinstance(old[first], (dict, list)):
        return f"{culprit}: {key} is a mapping, not a list: set its keys, e.g. {key}.KEY=VALUE"
    example = f"{key}.{first}={old[first]}" if overrides is not None else fix({first: old[first]})
    return f"{culprit}: {key} is a mapping, not a list: set its keys, e.g. {example}"


def _find_misfit(old: Any, new: Any, path: list[str]) -> tuple[list[str], Any, Any] | None:
    """The first key whose old value is a list and new one a mapping, or the other way round."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key, value in new.items():
            if key in old:
                found = _find_misfit(old[key], value, [*path, str(key)])
                if found is not None:
                    return found
        return None
    if (
        path
        and isinstance(old, (dict, list))
        and isinstance(new, (dict, list))
        and type(old) is not type(new)
    ):
        return path, old, new
    return None


def _flow(value: Any) -> str:
    """``value`` as YAML on one line (``{cuda: null}``, ``[1, 2]``)."""
    flow = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return flow.removesuffix("...").strip()


def _describe_list(key: str, entries: list[Any]) -> str:
    if key != "logger":
        return f"a list of {len(entries)} entries"
    names = [str(e.get("name", "?")) for e in entries if isinstance(e, dict)]
    return f"a list of loggers ({', '.join(names)})" if names else "a list of loggers"


def _override_key(override: str) -> str:
    return override.partition("=")[0].strip().lstrip("+~")


def _nested(key: str, outer: str) -> bool:
    """``key`` is ``outer`` or a key inside it (``logger.0.precision`` in ``logger``)."""
    return key == outer or key.startswith(f"{outer}.")


def typed_section(section: str, kind: Kind, raw: Any) -> DictConfig:
    """``raw`` merged over the config dataclass of the component its ``name`` selects, validated."""
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"section {section!r} must be a mapping with a `name`, got {type(raw).__name__}")
    name = raw.get("name") if not OmegaConf.is_missing(raw, "name") else None
    if not name:
        raise ConfigError(f"{section}.name is required (a registered {kind} or package.module:ClassName)")
    try:
        _, config_cls = lookup(kind, str(name))
    except RegistryError as e:
        raise ConfigError(f"{section}.name: {e}") from e
    try:
        return OmegaConf.merge(OmegaConf.structured(config_cls), raw)  # type: ignore[return-value]
    except TypeError as e:  # OmegaConf's "Cannot merge incompatible container types": named here
        found = _find_misfit(
            OmegaConf.to_container(OmegaConf.structured(config_cls), resolve=False),
            OmegaConf.to_container(raw, resolve=False),
            [],
        )
        if found is None:
            raise ConfigError(f"{section}: {_first_line(e)}") from e
        path, default, given = found
        takes = "a list" if isinstance(default, list) else "a mapping"
        shape = "mapping" if isinstance(given, dict) else "list"
        field, shown = f"{section}.{'.'.join(path)}", _flow(given)
        raise ConfigError(f"{field} takes {takes} (default {_flow(default)}), not the {shape} {shown}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f"{section}.{key}" if key else section
        given = OmegaConf.select(raw, str(key), default=None, throw_on_missing=False) if key else None
        if isinstance(e, ValidationError) and isinstance(given, (DictConfig, ListConfig)):
            # `trainer.device=cuda:` is YAML for a mapping ({cuda: null}): OmegaConf's words named a
            # DictConfig, not what was written or how to write it
            flow = _flow(OmegaConf.to_container(given, resolve=False))
            if isinstance(given, ListConfig):
                raise ConfigError(f"{where} takes a single value, but was given the list {flow}") from e
            raise ConfigError(
                f"{where} takes a single value, but was given the mapping {flow} (in YAML, a word "
                "that ends in ':' is a key): write the value whole, or quote it"
            ) from e
        allowed = ""
        if isinstance(e, ConfigKeyError) and key and "." not in str(key):  # a key the section lacks
            allowed = f" ({name} takes: {', '.join(f.name for f in dataclasses.fields(config_cls))})"
        raise ConfigError(f"{where}: {_first_line(e)}{allowed}") from e


def compose_config(config_files: list[str], overrides: list[str] | None = None) -> DictConfig:
    """Merges config files and overrides over the selected components' dataclasses, and validates.

    ``trainer.exp_dir`` may remain unset (``???``): it is filled when the run directory is claimed.

    Args:
        config_files: YAML paths or packaged names, merged in order.
        overrides: ``key=value`` strings applied last.

    Returns:
        The config tree with one typed node per section.

    Raises:
        ConfigError: Any invalid input, with one line naming it.
    """
    if not config_files:
        raise ConfigError("give at least one config file, e.g. `ml train digits`")
    paths = [find_config_file(arg) for arg in config_files]
    merged: Any = OmegaConf.create(DEFAULTS)
    layers = [(str(path), load_yaml(path), set[str]()) for path in paths]
    overrides = list(overrides or [])
    whole = {item.partition("=")[0].strip() for item in overrides} & set(SECTIONS)
    layers.append((f"overrides {' '.join(overrides)}", _parse_overrides(overrides), whole))
    for number, (where, layer, whole_sections) in enumerate(layers):
        _clear_swapped_sections(merged, layer, whole_sections)
        try:
            merged = OmegaConf.merge(merged, layer)
        except (OmegaConfBaseException, TypeError, ValueError, RecursionError) as e:  # e.g. a list given keys
            from_command_line = overrides if number == len(layers) - 1 else None
            shape = _shape_error(where, merged, layer, from_command_line)
            raise ConfigError(shape or f"{where} does not fit the config's shape: {_first_line(e)}") from e
    _relocate_run_config(merged, paths[-1], layers[-1][1])
    merged.pop("sweep", None)  # the command line's: it runs one config per point (ml.launchers.sweep)
    unknown = sorted(set(merged) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; sections are: {', '.join(SECTIONS)}")
    for section in ("model", "task", "optimizer"):
        if section not in merged:
            raise ConfigError(f"missing section {section!r} (with at least `name:`)")

    typed: dict[str, Any] = {}
    for section, kind in SECTIONS.items():
        raw = merged[section]
        if section == "logger":
            if not isinstance(raw, ListConfig):
                raise ConfigError("section 'logger' must be a list, e.g. [{name: stdout}, {name: jsonl}]")
            typed[section] = [typed_section(f"logger[{i}]", kind, item) for i, item in enumerate(raw)]
        else:
            typed[section] = typed_section(section, kind, raw)
    root = OmegaConf.create(typed)
    _check_complete(root)
    _check_logger_outputs(root)
    return root


# What each built-in logger writes in the run's log folder (``ml.loggers.*``'s file and folder
# names; tests/core/test_compose.py holds them to these). Two loggers with one output would write
# every record into it twice; a logger of another package is not known, and not checked.
_LOGGER_OUTPUTS: dict[str, str] = {
    "stdout": "stdout.log",  # (besides the terminal)
    "jsonl": "metrics.jsonl",
    "tensorboard": "tensorboard/",
    "wandb": "wandb/",  # (and a process holds one W&B run)
    "mlflow": "mlflow/",  # the local store, where no tracking_uri is set
}


def _check_logger_outputs(root: DictConfig) -> None:
    """Refuses two loggers that write the same output, naming both, before anything is created.

    MLflow loggers record into a store (``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the
    run folder's) and an experiment (``experiment_name``, else ``trainer.exp_name``): two into one
    store's one experiment record the run twice; into other experiments or stores, they do not.
    """
    registered = {lookup("logger", name)[0]: name for name in _LOGGER_OUTPUTS}
    seen: dict[tuple[str, ...], int] = {}
    for index, node in enumerate(root.logger):
        kind = registered.get(lookup("logger", str(node.name))[0])
        if kind is None:
            continue
        output: tuple[str, ...] = (_LOGGER_OUTPUTS[kind],)
        written = f"the log folder's one {output[0]}"
        if kind == "mlflow":
            store = node.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "the run folder's store"
            experiment = str(node.experiment_name or root.trainer.exp_name)
            output = (str(store), experiment)
            written = f"the run into one MLflow experiment ({experiment} in {store})"
        if output in seen:
            raise ConfigError(
                f"logger[{seen[output]}] and logger[{index}] are both {kind} loggers, which write "
                f"{written}: every record would be there twice; keep one of them in the logger list"
            )
        seen[output] = index


def _clear_swapped_sections(merged: DictConfig, layer: DictConfig, whole_sections: set[str]) -> None:
    """Empties each section of ``merged`` that ``layer`` replaces rather than adds to.

    A layer replaces a section when it names another component (``optimizer.name=sgd`` after
    ``adamw``), or gives the whole section on the command line (``optimizer='{name: sgd, lr: 0.1}'``):
    the section is then the new component's defaults plus only what this layer gives. The old
    component's keys are dropped even where the new one has a key of the same name, as a Hydra
    config-group swap replaces the group: an AdamW ``lr`` or ``weight_decay`` is no value for SGD.
    A whole section without a ``name`` keeps the component it replaces (its defaults again).
    """
    if not isinstance(layer, DictConfig):
        return
    for section in SECTIONS:
        _clear_swapped(merged, layer, section, whole=section in whole_sections)


def _clear_swapped(merged: DictConfig, layer: DictConfig, key: str, *, whole: bool) -> None:
    """The rule above for ``merged[key]``, then for each component nested in it (a mapping with a
    ``name``, e.g. the gan optimizer's ``generator``: ``optimizer.generator.name=sgd`` swaps it)."""
    if any(key not in c or OmegaConf.is_interpolation(c, key) for c in (merged, layer)):
        return  # (an interpolation is left for the validation to resolve, or to name if it cannot)
    old, new = merged.get(key), layer.get(key)
    if not isinstance(old, DictConfig) or not isinstance(new, DictConfig):
        return
    old_name, new_name = _written_name(old), _written_name(new)
    if whole or (new_name is not None and new_name != old_name):
        merged[key] = {} if new_name is not None or old_name is None else {"name": old_name}
        return
    for sub in new:
        _clear_swapped(old, new, str(sub), whole=False)


def _written_name(section: DictConfig) -> Any:
    """A section's ``name`` as written (an interpolation unresolved), or None if it has none."""
    written: Any = OmegaConf.to_container(section, resolve=False)
    name = written.get("name")
    return None if name in (None, "???") else name


def _relocate_run_config(merged: DictConfig, last_file: Path, command_line: Any) -> None:
    """A run's own ``config.yaml`` continues that run, even if its folder was moved since.

    A ``trainer.exp_dir`` the command line gives (``command_line``: its overrides) for another folder
    is refused rather than ignored: this config continues its own run.

    Raises:
        ConfigError: The command line gives another ``trainer.exp_dir``.
    """
    trainer = merged.get("trainer")
    if last_file.name != "config.yaml" or not isinstance(trainer, DictConfig) or "exp_dir" not in trainer:
        return
    if OmegaConf.is_missing(trainer, "exp_dir") or not (last_file.parent / "checkpoints").exists():
        return
    here = last_file.resolve().parent
    try:
        given = OmegaConf.select(command_line, "trainer.exp_dir", default=None, throw_on_missing=False)
    except OmegaConfBaseException:  # a `trainer=...` that is no mapping: the validation says so
        given = None
    if given is not None and given != "???" and Path(str(given)).expanduser().resolve() != here:
        raise ConfigError(
            f"trainer.exp_dir={given}: {last_file} continues its own run, in {here}; to start a new run "
            f"from its config, train a copy: cp {last_file} new.yaml && ml train new.yaml "
            f"trainer.exp_dir={given}"
        )
    if Path(str(trainer.exp_dir)).expanduser().resolve() != here:
        trainer.exp_dir = str(here)


def _check_complete(root: DictConfig) -> None:
    try:
        # missing_keys resolves interpolations too, so a broken `${...}` fails here as well.
        missing = sorted(k for k in OmegaConf.missing_keys(root) if k != "trainer.exp_dir")
        if missing:
            raise ConfigError(
                f"missing required value {missing[0]}: set it in the YAML or with {missing[0]}=..."
            )
        OmegaConf.to_container(root, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {_first_line(e)}") from e


def compose_args(args: list[str]) -> DictConfig:
    """The config of a command line's arguments: config files, then ``key=value`` overrides.

    Also names the experiment after the first config file, unless ``ML_EXP_NAME`` is set.
    """
    configs = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    root = compose_config(configs, overrides)
    set_default_exp_name(configs)
    return root


def set_default_exp_name(config_files: list[str]) -> None:
    """Names the experiment after the first config file (``digits`` for ``ml train digits``)."""
    if os.environ.get(EXP_NAME_ENV):
        return
    first = find_config_file(config_files[0])
    name = first.parent.name if first.name == "config.yaml" else first.stem
    os.environ[EXP_NAME_ENV] = name


@dataclass
class Objects:
    """The components of one run, built from a composed config."""

    config: DictConfig
    model: Any
    task: Any
    optimizer: Any
    lr_scheduler: Any
    loggers: list[Any]


def build_objects(root: DictConfig) -> Objects:
    """Constructs model, task, optimizer, scheduler and loggers (not the trainer: it claims a folder).

    The model's initial weights are drawn after seeding every generator with ``task.seed`` (when
    the task has one), so the same config starts from the same weights.

    Raises:
        ConfigError: A component rejected its config (the message names the section).
    """
    from ml.utils.seeding import seed_everything
    from ml.utils.startup_gc import imports_done

    imports_done()  # the `ml` command's collector at its own pace before the user's code runs
    if root.task.get("seed") is not None:
        seed_everything(int(root.task.seed))
    return Objects(
        config=root,
        model=build_component("model", "model", root.model),
        task=build_component("task", "task", root.task),
        optimizer=build_component("optimizer", "optimizer", root.optimizer),
        lr_scheduler=build_component("lr_scheduler", "lr_scheduler", root.lr_scheduler),
        loggers=[build_component(f"logger[{i}]", "logger", node) for i, node in enumerate(root.logger)],
    )


def build_component(section: str, kind: Kind, node: DictConfig) -> Any:
    """Constructs the component a typed config section names: the one place components are built.

    Raises:
        ConfigError: The component rejected its config (one line naming the section and component).
    """
    try:
        return build(kind, node)
    except (ValueError, TypeError, KeyError, OmegaConfBaseException) as e:
        raise ConfigError(f"{section} ({node.name}): {_first_line(e)}") from e
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not _OUT_OF_MEMORY.search(str(e)):
            raise
        # A size in the config that no memory holds (model.hidden=100000000000): the config's fault.
        raise ConfigError(
            f"{section} ({node.name}): out of memory while building it ({_first_line(e)}); check its sizes"
        ) from e


def build_launcher(root: DictConfig) -> Any:
    """Constructs the launcher named in the ``launcher`` section."""
    return build_component("launcher", "launcher", root.launcher)


# What a saved config keeps as written, unresolved: references to other keys of the same config
# (`${task.max_steps}`, `${oc.select:task.max_steps,null}`, a schedule's `${ml.task_steps:...}`), so
# that a run continued with another task.max_steps gets a schedule of that length, and secrets
# (`${ml.secret:NAME}`), so that their
# values never reach a file. Everything else (`${oc.env:...}`, `${ml.exp_name:...}`) is saved as
# the value it resolved to: the run goes on with what it started with.
_KEPT_AS_WRITTEN = re.compile(
    r"\$\{(?:oc\.select:)?\.*[A-Za-z_][\w.\[\]]*(?:,[^${}]*)?\}"  # ${task.max_steps}, ${oc.select:...}
    r"|\$\{ml\.secret:[A-Za-z_]\w*\}"  # a secret
    r"|\$\{ml\.task_steps:(?:\$\{oc\.select:[\w.]+,null\},?){4}\}"  # a schedule's length from the task's
)


def config_to_save(root: DictConfig) -> DictConfig:
    """The config as ``config.yaml`` and checkpoints hold it: resolved, but for references to other
    keys of the config and secrets, which stay as written (see :data:`_KEPT_AS_WRITTEN`).

    Call it before ``OmegaConf.resolve(root)``, which would replace the references.
    """

    def merge(raw: Any, resolved: Any) -> Any:
        if isinstance(raw, dict) and isinstance(resolved, dict):
            return {key: merge(raw[key], resolved[key]) for key in raw}
        if isinstance(raw, list) and isinstance(resolved, list):
            return [merge(a, b) for a, b in zip(raw, resolved, strict=True)]
        if isinstance(raw, str) and _KEPT_AS_WRITTEN.fullmatch(raw):
            return raw
        return resolved

    raw = OmegaConf.to_container(root, resolve=False)
    resolved = OmegaConf.to_container(root, resolve=True)
    return OmegaConf.create(merge(raw, resolved))


def config_fields(config_cls: type) -> list[tuple[str, str, str, str]]:
    """``(dotted name, type, default, help)`` for every field of a config dataclass, nested included."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, prefix: str, instance: Any = None) -> None:
        # A nested section's defaults are its default instance's values, which may differ from its
        # class's (task.train_dl is DataLoaderConfig(shuffle=True, drop_last=True)).
        for f in dataclasses.fields(cls):
            name = f"{prefix}{f.name}"
            default: Any = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if instance is not None:
                default = getattr(instance, f.name)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                walk(type(default), f"{name}.", default)
                continue
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append(
                (name, str(type_name).replace("typing.", ""), str(default), f.metadata.get("help", ""))
            )

    walk(config_cls, "")
    return rows

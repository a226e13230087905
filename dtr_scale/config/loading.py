"""Loading a run config: YAML (safe loader, duplicate keys refused) -> dataclasses, dotted overrides, and
errors that name the key and blame the file or the override that caused them."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dtr_scale.config.objective import resolve_objective_defaults
from dtr_scale.config.schema import ConfigError, RunConfig
from dtr_scale.config.validation import validate


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one) and reads numbers as
    YAML 1.2 does: PyYAML follows YAML 1.1, whose float needs a dot and a signed exponent, so `1e-4`, `3e5`,
    `1E-4` and `-.5` were strings there (and `lr: 1e-4`, the way papers write it, was refused)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

# The YAML 1.2 core schema's float (yaml.org/spec/1.2.2, 10.3.2), restricted to what YAML 1.1 reads as a string:
# an exponent with or without a dot or exponent sign (1e-4, 3e5, 1E-4, 1.0e4, .5e-3), or a leading dot after a
# sign (-.5). Appended after PyYAML's own resolvers, so ints (1000, 0x10) and 1.1 floats (1.5, .inf) are
# resolved as before; SafeLoader's float constructor (Python's float()) then reads the text.
_YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+|[-+]\.[0-9][0-9_]*)$"
)
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse config YAML text: safe (no Python objects), duplicate keys refused (ConfigError), YAML 1.2 floats
    (`1e-4`, `3e5`). Config files, `key=value` overrides and the configs saved with checkpoints all use it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Check (and mildly coerce: int -> float) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        # An integral float is the integer it writes (train.max_steps=3e5, reduce_bucket_size: 1e7): papers and
        # DeepSpeed configs write counts that way. 1.5 or 1e400 (inf) is refused.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = (
                " (YAML writes them .nan / .inf, and no key takes one)"
                if value in ("nan", "inf", "-inf")
                else ""
            )
            raise ConfigError(f"{key}: expected a number, got {value!r}{hint}")
        # No key means anything by NaN or infinity, and NaN would pass every range check.
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _check_type(value, annotation, key)
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override (value parsed as YAML, `load_yaml`) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key component")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({err.problem})") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (safe loader), apply dotted overrides, validate; errors name the key and file."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    sources = config_sources(data, source, overrides)
    for override in overrides:
        apply_override(data, override)
    try:
        cfg = _build(RunConfig, data, "")
        validate(cfg)
    except ConfigError as err:
        if len(err.keys) > 1:  # a rule between keys: say where each one's value came from
            raise ConfigError(f"{err} ({_provenance(_unvalidated(data), err.keys, sources)})") from None
        raise ConfigError(f"{_blame(err, overrides, source)}: {err}") from None
    return resolve_objective_defaults(cfg)


def explain(
    err: ConfigError, cfg: RunConfig, path: str | Path | None, overrides: list[str] | tuple[str, ...]
):
    """`err`, raised after loading (e.g. the batch layout for the launched world size), with the value and source
    of each key it names appended, as `load_config` does for a rule between keys; unchanged without keys."""
    if not err.keys:
        return err
    data = (load_yaml(Path(path).read_text()) or {}) if path is not None else {}
    sources = config_sources(data, str(path) if path is not None else "defaults", overrides)
    return ConfigError(f"{err} ({_provenance(cfg, err.keys, sources)})")


def config_sources(
    file_data: dict[str, Any], source: str, overrides: list[str] | tuple[str, ...]
) -> dict[str, str]:
    """Where each key set by the config file or an override came from: dotted key -> "FILE" or
    "override KEY=VALUE" (the last override of the key or of a section above it wins). Keys not in the map
    keep their default."""
    sources: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for name, value in node.items():
                walk(value, f"{prefix}.{name}" if prefix else str(name))
        elif prefix:
            sources[prefix] = source

    walk(file_data, "")
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        for known in [k for k in sources if k == key or k.startswith(key + ".")]:
            del sources[known]
        sources[key] = f"override {override}"
    return sources


def _unvalidated(data: dict[str, Any]) -> RunConfig | None:
    """The config built without validation (for reporting values), or None if it does not build."""
    try:
        return _build(RunConfig, data, "")
    except ConfigError:
        return None


def _provenance(cfg: RunConfig | None, keys: tuple[str, ...], sources: dict[str, str]) -> str:
    """ "repa.depth=8 from the defaults, model.depth=4 from override model.depth=4" for the keys of a rule."""
    parts = []
    for key in keys:
        value: Any = cfg
        for name in key.split("."):
            value = getattr(value, name, None)
        source = next((sources[k] for k in _prefixes(key) if k in sources), "the defaults")
        parts.append(f"{key}={_show(value)} from {source}")
    return ", ".join(parts)


def _prefixes(key: str) -> list[str]:
    """ "a.b.c" -> ["a.b.c", "a.b", "a"]: the key itself first, then the sections above it."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _show(value: Any) -> str:
    """A value as the user writes it in YAML (null, true, 8, a path)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _blame(err: ConfigError, overrides: list[str], source: str) -> str:
    """The command-line override whose key (or a dotted prefix of it) the error names, else the file. The
    "(known: ...)" list of an unknown-key error is not searched; a later override wins over an earlier one."""
    message = str(err).split("(known")[0]
    for override in reversed(overrides):
        parts = override.split("=", 1)[0].strip().split(".")
        prefixes = [".".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.search(rf"(?<![\w.]){re.escape(p)}(?![\w.])", message) for p in prefixes[::-1]):
            return f"override {override}"
    return source


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from nested dicts (e.g. the YAML saved with a checkpoint); ConfigError names the
    key."""
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return resolve_objective_defaults(cfg)

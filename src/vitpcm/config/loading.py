"""Reading a config: file lookup, strict YAML, ``--set`` overrides, type coercion.

Every value is coerced to its declared type and checked once, at load time, so a bad key or
value fails before any data is read, with a :class:`~vitpcm.errors.ConfigError` naming the
dotted key and where it came from (``config FILE:LINE:COL: what`` for YAML errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vitpcm.config.schema import Config
from vitpcm.config.validation import Sources, resolve
from vitpcm.errors import ConfigError, StorageError

CONFIG_DIR_ENV = "VITPCM_CONFIG_DIR"


def config_search_dirs() -> list[Path]:
    """Folders searched for a bare config name: ``$VITPCM_CONFIG_DIR``, then repo ``configs/``."""
    dirs = [Path(p) for p in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if p]
    repo_configs = Path(__file__).resolve().parents[3] / "configs"
    if repo_configs.is_dir():
        dirs.append(repo_configs)
    return dirs


def available_configs() -> list[str]:
    """Names (without ``.yaml``) of the configs found in :func:`config_search_dirs`."""
    names = {
        p.stem for d in config_search_dirs() if d.is_dir() for p in d.glob("*.y*ml") if p.is_file()
    }
    return sorted(names)


def resolve_config_path(path_or_name: str | os.PathLike[str]) -> str:
    """Turn a file path, URI or bare name like ``synthetic`` into the file to read."""
    text = str(path_or_name)
    if text.startswith(("s3://", "http://", "https://")):
        return text
    text = text.removeprefix("file://")
    path = Path(text)
    if path.is_file():
        return text
    if path.is_dir():
        raise ConfigError(f"config {text} is a folder; pass a YAML file or a config name")
    is_bare_name = os.sep not in text and "/" not in text
    if is_bare_name and text:
        suffixes = ("",) if path.suffix in (".yaml", ".yml") else (".yaml", ".yml")
        for folder in config_search_dirs():
            for suffix in suffixes:
                candidate = folder / f"{text}{suffix}"
                if candidate.is_file():
                    return str(candidate)
    searched = ", ".join(str(d) for d in config_search_dirs()) or f"none (set ${CONFIG_DIR_ENV})"
    raise ConfigError(
        f"config {text!r} not found: no such file, and no {Path(text).stem}.yaml in the config "
        f"folders ({searched}); available: {', '.join(available_configs()) or 'none'}"
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last."""


def _construct_strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *defaults`` merges are meant to be overridden by the keys after them
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first set on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
)


def _yaml_error_line(source: str, exc: yaml.YAMLError) -> str:
    """One line ``config FILE:LINE:COL: what`` (1-based, like compilers) for a YAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        what += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    if "constructor for the tag" in what:
        tag = what.rpartition("for the tag ")[2].replace("tag:yaml.org,2002:", "!!")
        return (
            f"config {where}: the tag {tag} is not allowed: config files hold plain YAML "
            "values only"
        )
    return f"config {where}: not valid YAML: {what}"


def _read_yaml(source: str) -> dict[str, Any]:
    try:
        if source.startswith(("s3://", "http://", "https://")):
            from vitpcm import storage

            text = storage.read_bytes(source).decode("utf-8")
        else:
            text = Path(source).read_text(encoding="utf-8")
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {source}: {exc}") from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_line(source, exc)) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {source}: the top level must be a mapping of sections, "
            f"got {type(raw).__name__}"
        )
    return raw


@dataclasses.dataclass(frozen=True)
class _RawOverride:
    """An override's value text, parsed only once the declared type of its key is known."""

    text: str


def _apply_override(raw: dict[str, Any], item: str, sources: Sources) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"bad override {item!r}: {section} is a value, not a section")
        node = child
    node[parts[-1]] = _RawOverride(value.strip())
    sources.overrides[key] = item


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, f"{prefix}{f.name}."))
    return keys


def _unknown_key(key: str, sources: Sources) -> ConfigError:
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # a right name in the wrong section, e.g. ``lr`` for ``train.lr``
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return sources.error(key, f"unknown key{hint}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return "a mapping" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, sources: Sources) -> Any:
    """Convert ``value`` to the declared type ``hint`` or raise an error naming ``key``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if isinstance(value, _RawOverride):
        value = _parse_override(value.text, base, key, sources)
    if value is None:
        if optional:
            return None
        if dataclasses.is_dataclass(base):  # an empty section in YAML means "all defaults"
            return _build(base, {}, f"{key}.", sources)
        raise sources.error(key, f"expected {_type_name(hint)}, got null")
    expected = f"expected {_type_name(hint)}, got {value!r}"
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise sources.error(key, expected)
        return _build(base, value, f"{key}.", sources)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise sources.error(key, f"{expected} (use true or false)")
    if isinstance(value, bool):  # bool is an int subclass; ``epochs: yes`` is a mistake
        raise sources.error(key, expected)
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # a quoted number, or ``1e3`` that YAML 1.1 leaves a string
            try:
                return int(value.strip())
            except ValueError:
                with contextlib.suppress(ValueError):
                    number = float(value)
                    if number.is_integer():
                        return int(number)
                raise sources.error(key, expected) from None
        if isinstance(value, int):
            return value
        raise sources.error(key, expected)
    if base is float:
        # PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as a string.
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise sources.error(key, f"expected a finite float, got {value!r}")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):
            return str(value)
        raise sources.error(key, expected)
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _parse_override(text: str, base: Any, key: str, sources: Sources) -> Any:
    try:
        parsed = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        if base is str:
            return text
        raise sources.error(key, f"cannot parse value {text!r} as YAML") from None
    if base is str and parsed is not None and not isinstance(parsed, str):
        # Strings keep the text as typed: ``name=2024`` or ``data.uri=a:b`` are names, not numbers.
        return text
    return parsed


def _build(cls: type, raw: Mapping[Any, Any], prefix: str, sources: Sources) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(dotted, sources)
        kwargs[key] = _coerce(value, hints[key], dotted, sources)
    return cls(**kwargs)


def config_from_dict(
    raw: Mapping[str, Any], overrides: Sequence[str] | None = (), source: str | None = None
) -> Config:
    """Build, resolve and validate a config from nested dicts (e.g. ``Config.to_dict()``).

    Args:
        raw: Sections and values; missing ones keep their defaults.
        overrides: ``KEY=VALUE`` strings with dotted keys, applied after ``raw``.
        source: Where ``raw`` came from, quoted in error messages.
    """
    sources = Sources(source)
    tree = _deep_copy_dicts(raw)
    for item in overrides or ():  # argparse leaves None when --set is never given
        _apply_override(tree, item, sources)
    cfg = _build(Config, tree, "", sources)
    return resolve(cfg, sources)


def _deep_copy_dicts(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_dicts(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(
    path_or_name: str | os.PathLike[str], overrides: Sequence[str] | None = ()
) -> Config:
    """Load a YAML config, apply ``--set`` overrides, fill presets and validate.

    Args:
        path_or_name: A YAML file path, an ``s3://``/``http(s)://`` URI, or a bare name like
            ``synthetic`` looked up in ``$VITPCM_CONFIG_DIR`` and then the repo's ``configs/``.
        overrides: ``KEY=VALUE`` strings with dotted keys (``train.lr=3e-4``,
            ``model.pretrained=null``); values are read as YAML scalars and coerced to the
            field's type.

    Returns:
        The resolved config.

    Raises:
        ConfigError: The file is missing or malformed, or a key or value is invalid.
    """
    source = resolve_config_path(path_or_name)
    return config_from_dict(_read_yaml(source), overrides, source=source)


def resolve_config(cfg: Config) -> Config:
    """Fill presets and derived sizes of a config built in code, then validate it (in place)."""
    return resolve(cfg, Sources(None))


def save_config(cfg: Config, uri: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML to a local path or ``s3://`` URI, atomically."""
    from vitpcm import storage

    header = "# Resolved vitpcm config: load it with vitpcm.config.load_config.\n"
    storage.write_bytes(uri, (header + cfg.to_yaml()).encode("utf-8"))


def dump_defaults() -> str:
    """The default (paper VOC, ViT-B/16) config, resolved, as YAML text."""
    return resolve_config(Config()).to_yaml()

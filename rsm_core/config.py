"""Structured configs: a dataclass schema, YAML overlays and key=value overrides, checked strictly.

An unknown key or a value of the wrong type is a ``ConfigError`` that names the key, where it came
from, and what would have been valid — so a typo in a sweep file fails at start-up, not an hour in.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config key or value is not what the schema allows."""


class InvalidValue(ConfigError):
    """A value of the right type outside its allowed range or choices (raised by a config's checks)."""

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(f"bad value for config key '{key}': {detail}")

    def under(self, prefix: str) -> InvalidValue:
        """The same error with the key's full path (a section checks only its own keys)."""
        return InvalidValue(f"{prefix}.{self.key}", self.detail)


def require(condition: bool, key: str, detail: str) -> None:
    """A config check for ``__post_init__``: the message names the key and what is allowed."""
    if not condition:
        raise InvalidValue(key, detail)


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _parent_node(cfg: DictConfig, dotted: str) -> Any:
    parent = dotted.rpartition(".")[0]
    return OmegaConf.select(cfg, parent) if parent else cfg


def _explain(cfg: DictConfig, error: OmegaConfBaseException, source: str, key: str = "?") -> ConfigError:
    """Turn an omegaconf error into a message with the full key, the source and the valid choices."""
    key = getattr(error, "full_key", None) or key
    if isinstance(error, ConfigKeyError | ConfigAttributeError):
        leaf = key.rpartition(".")[2]
        valid = _valid_keys(_parent_node(cfg, key))
        close = difflib.get_close_matches(leaf, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        valid_list = ", ".join(valid)
        return ConfigError(f"unknown config key '{key}' in {source}.{hint} Valid keys here: {valid_list}")
    # omegaconf's first line names the expected type or the choices
    detail = (
        str(error.msg) if getattr(error, "msg", None) else f"{type(error).__name__}: {error}"
    ).splitlines()[0]
    return ConfigError(f"bad value for config key '{key}' in {source}: {detail}")


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        siblings = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        available = f" Available here: {', '.join(siblings)}." if siblings else ""
        raise ConfigError(f"config file {path} does not exist.{available}")
    return OmegaConf.create(yaml.safe_load(path.read_text()) or {})


def load_config(schema: type, *yaml_paths: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The schema's defaults, then each YAML file in order, then dotted ``key=value`` overrides.

    An override may index a list (``seeds.1=3``); whatever it cannot set is a ``ConfigError``.
    """
    cfg = OmegaConf.structured(schema)
    for path in yaml_paths:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as error:
            raise _explain(cfg, error, f"file {path}") from None
    for item in overrides:
        cfg = apply_override(cfg, item)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """``cfg`` with one dotted ``key=value`` applied (the value parsed as omegaconf parses a command
    line). A list entry (``seeds.1=3``) is set by replacing the whole list with the edited copy."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    source = f"override '{item}'"
    value = OmegaConf.from_dotlist([f"value={text}"])["value"]
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, prefix)
        if isinstance(node, ListConfig):
            index = parts[depth]
            if not index.isdigit() or int(index) >= len(node):
                entries = OmegaConf.to_container(node)
                what = f"a list of {len(node)} entries ({entries}); use an index below {len(node)}"
                raise ConfigError(
                    f"bad list index in {source}: '{prefix}' is {what if len(node) else 'an empty list'}, "
                    f"or set the whole list with {prefix}=[...]"
                )
            edited = OmegaConf.create(OmegaConf.to_container(node))
            rest = ".".join(parts[depth + 1 :])
            if rest:
                entry = edited[int(index)]
                if not isinstance(entry, DictConfig):
                    raise ConfigError(
                        f"cannot set '{key}' in {source}: '{prefix}.{index}' is the value {entry!r}, "
                        "not a section"
                    )
                OmegaConf.update(entry, rest, value, merge=True)
            else:
                edited[int(index)] = value
            key, value = prefix, edited
            break
        if node is not None and not isinstance(node, DictConfig):
            raise ConfigError(
                f"cannot set '{key}' in {source}: '{prefix}' is the value {node!r}, not a section"
            )
    layer: Any = value
    for part in reversed(key.split(".")):
        layer = {part: layer}
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as error:
        raise _explain(cfg, error, source, key) from None


def config_to_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (enums as their names), for snapshots and wandb."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

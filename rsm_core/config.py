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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config key or value is not what the schema allows."""


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _parent_node(cfg: DictConfig, dotted: str) -> Any:
    parent = dotted.rpartition(".")[0]
    return OmegaConf.select(cfg, parent) if parent else cfg


def _explain(cfg: DictConfig, error: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an omegaconf error into a message with the full key, the source and the valid choices."""
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError | ConfigAttributeError):
        leaf = key.rpartition(".")[2]
        valid = _valid_keys(_parent_node(cfg, key))
        close = difflib.get_close_matches(leaf, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        valid_list = ", ".join(valid)
        return ConfigError(f"unknown config key '{key}' in {source}.{hint} Valid keys here: {valid_list}")
    detail = str(error.msg).splitlines()[0]  # omegaconf's first line names the expected type or the choices
    return ConfigError(f"bad value for config key '{key}' in {source}: {detail}")


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        siblings = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        available = f" Available here: {', '.join(siblings)}." if siblings else ""
        raise ConfigError(f"config file {path} does not exist.{available}")
    return OmegaConf.create(yaml.safe_load(path.read_text()) or {})


def load_config(schema: type, *yaml_paths: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The schema's defaults, then each YAML file in order, then dotted ``key=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    layers = [(f"file {p}", _read_yaml(Path(p))) for p in yaml_paths]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as error:
            raise _explain(cfg, error, source) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_to_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (enums as their names), for snapshots and wandb."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

"""A YAML file an option names (``--config``, ``--model-config``), read with one-line errors."""

from __future__ import annotations

import os
from typing import Any

import yaml

from cellarium_steps.data.errors import ConfigError


def read_yaml_config(path: str, option: str) -> Any:
    """The parsed file (an empty file is ``{}``); a missing file or invalid YAML is a ConfigError
    naming ``option`` and ``path``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: {path}: no such file")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{option}: {path}: not valid YAML ({e})") from None

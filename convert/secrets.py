"""Secrets in storage options: resolved where used, never shipped inside a task graph.

A config's `storage_options` may hold
  ${VAR}          an environment variable, kept as a reference in the Config and resolved where the
                  options are used: on the client and on each worker (from *its* environment);
  literal values  under secret-looking keys (secret, token, password, key, ...). Before the config
                  is sent to workers `seal_config` swaps each for a `${secret:<id>}` reference, and
                  the executor's `share_secrets` hands the values to the workers out of band (Dask:
                  a WorkerPlugin, removed again when the run ends), so task arguments, Dask's
                  "Compute Failed" logs and scheduler task state only ever see the reference.
Standard credentials (AWS_* variables, AWS_PROFILE / ~/.aws, instance roles) are read by the
storage client itself on every machine and never pass through here.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from typing import Any

from .config import Config, ConfigError
from .redact import is_secret_key

_ANY_REF = re.compile(r"\$\{(secret:[0-9a-f]{32}|[A-Za-z_][A-Za-z0-9_]*)\}")
_REGISTRY: dict[str, str] = {}  # reference id -> value, in this process (filled by SecretsPlugin)
_LOCK = threading.Lock()


def resolve_options(options: Any, where: str = "storage_options") -> Any:
    """A copy of `options` with ${VAR} and ${secret:id} references replaced by their values.

    Raises ConfigError naming the key and the variable (never a value) when one is unknown here.
    """
    if isinstance(options, dict):
        return {k: resolve_options(v, f"{where}.{k}") for k, v in options.items()}
    if isinstance(options, list):
        return [resolve_options(v, where) for v in options]
    if not isinstance(options, str) or "${" not in options:
        return options

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith("secret:"):
            with _LOCK:
                value = _REGISTRY.get(name[7:])
            if value is None:
                raise ConfigError(
                    f"{where}: a secret given in the config is not registered in this process "
                    f"(pid {os.getpid()}); run through convert.run, which shares it with the workers"
                )
            return value
        if name not in os.environ:
            raise ConfigError(
                f"{where}: environment variable ${{{name}}} is not set on this machine "
                f"(pid {os.getpid()}); export it here and for the Dask workers, or use an AWS profile"
            )
        return os.environ[name]

    return _ANY_REF.sub(sub, options)


def resolve_config(config: Config) -> Config:
    """The config with source/output storage options resolved (for use in this process only)."""
    updates = {}
    for section in ("source", "output"):
        part = getattr(config, section)
        opts = resolve_options(part.storage_options, f"{section}.storage_options")
        if opts != part.storage_options:
            updates[section] = part.model_copy(update={"storage_options": opts})
    return config.model_copy(update=updates) if updates else config


def _seal(options: Any, found: dict[str, str], secret: bool = False) -> Any:
    if isinstance(options, dict):
        return {k: _seal(v, found, secret or is_secret_key(k)) for k, v in options.items()}
    if isinstance(options, list):
        return [_seal(v, found, secret) for v in options]
    if secret and isinstance(options, str) and options and not _ANY_REF.search(options):
        ref = uuid.uuid4().hex
        found[ref] = options
        return f"${{secret:{ref}}}"
    return options


def seal_config(config: Config) -> tuple[Config, dict[str, str]]:
    """(config safe to ship, {reference id: value}) with literal secrets swapped for references."""
    found: dict[str, str] = {}
    updates = {}
    for section in ("source", "output"):
        part = getattr(config, section)
        opts = _seal(part.storage_options, found)
        if opts != part.storage_options:
            updates[section] = part.model_copy(update={"storage_options": opts})
    return (config.model_copy(update=updates) if updates else config), found


def register(values: dict[str, str]) -> None:
    with _LOCK:
        _REGISTRY.update(values)


def unregister(refs: Any) -> None:
    with _LOCK:
        for ref in refs:
            _REGISTRY.pop(ref, None)

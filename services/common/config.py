"""Typed configuration: defaults in dataclasses, then a TOML file, then environment variables.

Every process reads two sections: the shared ``[pylon]`` section (``CommonConfig``) and its own
(``[room]``, ``[center]`` ...), each a dataclass defined next to the service that uses it.
Environment overrides are ``PYLON_<SECTION>_<FIELD>`` (``PYLON_ROOM_PORT=7100``,
``PYLON_PYLON_REDIS_URL`` is also accepted as ``PYLON_REDIS_URL``). Values are validated at
start; a bad value raises ``ConfigError`` and the CLI exits with code 1 and a clear message.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """The operator's configuration is wrong. The message says which key and why."""


@dataclasses.dataclass
class CommonConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: str = ""
    mysql_database: str = "pylon"
    mysql_unix_socket: str = ""
    region: str = "default"
    # address other processes and clients use to reach this host
    advertise_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # "text" (one readable line per event) or "json" (one object per line, for a log shipper)
    log_format: str = "text"
    # discovery: instances heartbeat every ttl/3 and vanish ttl seconds after the last one
    discovery_ttl_s: float = 10.0
    discovery_refresh_s: float = 2.0
    rpc_channels_per_target: int = 2
    rpc_deadline_s: float = 5.0
    # Internal calls over lanes (services/common/lanes.py: framed TCP, ~10x cheaper per call than
    # a unary grpc.aio call here) where the callee announces one; register, saver and room serve
    # one beside gRPC on a free port of the gRPC host. false: gRPC only, no lane port opened.
    rpc_lanes: bool = True

    def validate(self) -> None:
        require(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "pylon.redis_url", "must be a redis:// URL")
        require(0 < self.mysql_port < 65536, "pylon.mysql_port", "must be a TCP port")
        not_placeholder(self.mysql_password, "pylon.mysql_password")
        require(self.discovery_ttl_s >= 1, "pylon.discovery_ttl_s", "must be >= 1")
        require(self.rpc_channels_per_target >= 1, "pylon.rpc_channels_per_target", "must be >= 1")
        require(self.rpc_deadline_s > 0, "pylon.rpc_deadline_s", "must be > 0")
        require(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "pylon.log_level", "DEBUG|INFO|WARNING|ERROR")
        require(self.log_format in ("text", "json"), "pylon.log_format", "text|json")


def require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


# The example secrets (deploy/k8s/secret.yaml) start with this; a service refuses them, so a
# cluster applied without replacing them does not run with a key anyone can read in the repository.
PLACEHOLDER_PREFIX = "CHANGE-ME"


def not_placeholder(value: str, key: str) -> None:
    require(not value.upper().startswith(PLACEHOLDER_PREFIX), key,
            f"is still the placeholder {value[:len(PLACEHOLDER_PREFIX)]}...; set a secret of your own "
            "(for example: openssl rand -hex 16)")


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            if not isinstance(raw, (str, int, float)):
                raise ValueError(raw)
            return str(raw)
        if origin in (list, tuple):
            (item,) = typing.get_args(kind)[:1]
            items = [x for x in str(raw).split(",") if x.strip()] if isinstance(raw, str) else list(raw)
            return [_coerce(key, x.strip() if isinstance(x, str) else x, item) for x in items]
        if origin is dict:
            if not isinstance(raw, Mapping):
                raise ValueError(raw)
            _, vkind = typing.get_args(kind)
            return {str(k): _coerce(f"{key}.{k}", v, vkind) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"{key}: unsupported type {kind}")


def build(cls: type[T], section: str, values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> T:
    """Build a config dataclass from defaults, ``values`` (a TOML table) and ``env``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in (values or {}).items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(f"{section}.{key}", raw, hints[key])
    env = os.environ if env is None else env
    prefixes = [f"PYLON_{section.upper()}_"] + (["PYLON_"] if section == "pylon" else [])
    for name in names:
        for prefix in prefixes:
            var = prefix + name.upper()
            if var in env:
                kwargs[name] = _coerce(var, env[var], hints[name])
                break
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def read_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load(section_cls: type[T], section: str, path: str | None = None, env: Mapping[str, str] | None = None,
         **overrides: Any) -> tuple[CommonConfig, T]:
    """(shared config, this service's section). ``overrides`` come from CLI flags and win."""
    data = read_file(path)
    common = build(CommonConfig, "pylon", data.get("pylon", {}), env)
    values = dict(data.get(section, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return common, build(section_cls, section, values, env)

"""Settings: one typed, frozen value built once at the edge.

Precedence: command-line flags > ``JOBTOKEN_*`` variables > config file (TOML,
``$JOBTOKEN_CONFIG`` or ``/etc/jobtoken/jobtoken.toml``) > defaults. The site part
(``[site]``) is the upper bound of what any job may get: jobs may narrow scopes and
audiences, never widen them. Parsing is strict: an unknown key is an error, because
a typo in a security setting must not silently fall back to a default.

No network, no token reads here.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ._errors import ConfigError

__all__ = [
    "BrokerConfig",
    "DEFAULT_BROKER_SOCKET",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "RenewalConfig",
    "ServerConfig",
    "SiteConfig",
    "TokenConfig",
    "load_config",
    "missing_setting",
    "setting",
]

DEFAULT_CONFIG_PATH = Path("/etc/jobtoken/jobtoken.toml")
DEFAULT_BROKER_SOCKET = "/run/jobtoken/broker.sock"


@dataclass(frozen=True)
class ServerConfig:
    url: Optional[str] = None
    ca_file: Optional[str] = None
    ca_dir: Optional[str] = None
    allow_http: bool = False  # plain http, and only to a loopback address
    timeout_s: float = 10.0
    # all requests of one prepare/token/stage 0 together (0: no limit): a server that
    # drips its answer never trips the per-read timeout_s
    deadline_s: float = 120.0


@dataclass(frozen=True)
class TokenConfig:
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    mytoken_file: Optional[str] = None
    mytoken_env: Optional[str] = None
    min_valid_s: float = 0.0
    trusted_issuers: Tuple[str, ...] = ()  # non-empty: verify AT signatures via JWKS


@dataclass(frozen=True)
class SiteConfig:
    parent_mytoken_file: Optional[str] = None
    allowed_scopes: Tuple[str, ...] = ()
    allowed_audiences: Tuple[str, ...] = ()
    scope_templates: Tuple[str, ...] = ("storage.create:/{vo}/jobs/{job_id}",)
    vo: Optional[str] = None  # the VO in scope templates; the job's own claim is ignored ...
    job_may_choose_vo: bool = False  # ... unless this is set, and then only one of allowed_vos
    allowed_vos: Tuple[str, ...] = ()
    default_walltime_s: float = 48 * 3600.0
    max_walltime_s: float = 7 * 24 * 3600.0  # caps what a job's ad asks for
    walltime_slack_s: float = 1800.0
    expected_at_lifetime_s: float = 1200.0  # sizes the usages_AT budget; shorter = more
    max_usages_at: Optional[int] = None  # caps the job mytoken's usages_AT budget
    # the Mytoken server's maximum mytoken lifetime, if the site knows it (its discovery
    # does not publish it): a job mytoken's exp is capped at now + this before minting
    max_mytoken_lifetime_s: Optional[float] = None
    hosts: Tuple[str, ...] = ()
    token_dir_base: Optional[str] = None


@dataclass(frozen=True)
class RenewalConfig:
    fraction: float = 2.0 / 3.0
    margin_s: float = 300.0
    max_backoff_s: float = 300.0
    on_failure: str = "keep"  # "keep" the payload running, or "stop" it
    warn_signal: Optional[str] = None  # e.g. "USR1", sent warn_before_s before expiry
    warn_before_s: float = 120.0
    stop_grace_s: float = 30.0
    revoke_at_end: bool = True
    metrics_dir: Optional[str] = None
    log_json: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    """The node broker (docs/broker.md): where it listens, keeps its state, learns identities."""

    socket: str = DEFAULT_BROKER_SOCKET
    state_dir: str = "/var/lib/jobtoken/broker"
    identity: str = "registered"  # the resolver: "registered" (built in) or "condor"
    workers: int = 4  # threads for the HTTP calls (the event loop itself never blocks)
    reconcile_s: float = 10.0  # how often every anchor is checked (also without pidfd)
    # accept "adopt": a job hands in the mytoken it brought (ARC's stage 0 minted it on the
    # CE). Off by default: a node whose jobs get their mytokens from the broker never takes one
    adopt: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    token: TokenConfig = TokenConfig()
    site: SiteConfig = SiteConfig()
    renewal: RenewalConfig = RenewalConfig()
    broker: BrokerConfig = BrokerConfig()
    source: Optional[str] = None  # the file it came from, for messages


_SECTIONS: Dict[str, type] = {
    "server": ServerConfig,
    "token": TokenConfig,
    "site": SiteConfig,
    "renewal": RenewalConfig,
    "broker": BrokerConfig,
}

# variable -> (section, key); values are parsed like the TOML value of that key
_ENV: Dict[str, Tuple[str, str]] = {
    "JOBTOKEN_SERVER": ("server", "url"),
    "JOBTOKEN_CA_FILE": ("server", "ca_file"),
    "JOBTOKEN_CA_DIR": ("server", "ca_dir"),
    "JOBTOKEN_ALLOW_HTTP": ("server", "allow_http"),
    "JOBTOKEN_TIMEOUT": ("server", "timeout_s"),
    "JOBTOKEN_DEADLINE": ("server", "deadline_s"),
    "JOBTOKEN_SCOPE": ("token", "scopes"),
    "JOBTOKEN_AUDIENCE": ("token", "audiences"),
    "JOBTOKEN_MYTOKEN_FILE": ("token", "mytoken_file"),
    "JOBTOKEN_MYTOKEN_ENV": ("token", "mytoken_env"),
    "JOBTOKEN_TRUSTED_ISSUERS": ("token", "trusted_issuers"),
    "JOBTOKEN_PARENT_MYTOKEN_FILE": ("site", "parent_mytoken_file"),
    "JOBTOKEN_VO": ("site", "vo"),
    "JOBTOKEN_TOKEN_DIR_BASE": ("site", "token_dir_base"),
    "JOBTOKEN_EXPECTED_AT_LIFETIME": ("site", "expected_at_lifetime_s"),
    "JOBTOKEN_ON_FAILURE": ("renewal", "on_failure"),
    "JOBTOKEN_METRICS_DIR": ("renewal", "metrics_dir"),
    "JOBTOKEN_BROKER_SOCKET": ("broker", "socket"),
}


# setting -> the command-line flag that sets it (the flags themselves are in _cliargs and cli;
# tests/test__config.py checks each is one), so that a message names both
_FLAGS: Dict[Tuple[str, str], str] = {
    ("server", "url"): "--server",
    ("server", "ca_file"): "--ca-file",
    ("server", "ca_dir"): "--ca-dir",
    ("server", "allow_http"): "--allow-http",
    ("server", "timeout_s"): "--timeout",
    ("server", "deadline_s"): "--server-deadline",
    ("token", "scopes"): "--scope",
    ("token", "audiences"): "--audience",
    ("token", "mytoken_file"): "--mytoken-file",
    ("token", "mytoken_env"): "--mytoken-env",
    ("token", "trusted_issuers"): "--trusted-issuer",
    ("token", "min_valid_s"): "--min-valid",
    ("site", "parent_mytoken_file"): "--parent-mytoken-file",
    ("site", "vo"): "--vo",
    ("site", "token_dir_base"): "--token-dir-base",
    ("site", "expected_at_lifetime_s"): "--expected-at-lifetime",
    ("renewal", "on_failure"): "--on-failure",
    ("renewal", "warn_signal"): "--warn-signal",
    ("renewal", "warn_before_s"): "--warn-before",
    ("renewal", "margin_s"): "--margin",
    ("renewal", "metrics_dir"): "--metrics-dir",
    ("renewal", "log_json"): "--log-json",
}


def setting(name: str) -> str:
    """A setting as every message names it: ``server.url (--server, $JOBTOKEN_SERVER)``.

    The config key, then the flag and variable that set it too, so the reader can fix
    it where they set it (a hook's ``_ARGS`` knob, a job's environment, the site file).
    """
    section, _, key = name.partition(".")
    ways = [_FLAGS[(section, key)]] if (section, key) in _FLAGS else []
    ways += [f"${var}" for var, where in _ENV.items() if where == (section, key)]
    return f"{name} ({', '.join(ways)})" if ways else name


def missing_setting(what: str, *names: str) -> ConfigError:
    """The error for a setting nobody gave: ``no WHAT: set A (--a, $A) or B (--b)``."""
    return ConfigError(f"no {what}: set {' or '.join(setting(n) for n in names)}")


def _words(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v for v in value.split() if v)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError("expected a list of strings or a space-separated string")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise TypeError("expected true or false")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError("expected a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite, non-negative number")
    return number


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError("expected a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


# The parser of each setting type, chosen by the resolved type itself (``Tuple[str, ...]``
# and ``tuple[str, ...]`` are the same key), never by the text of an annotation.
_PARSERS: Dict[Any, Callable[[Any], Any]] = {
    (tuple, (str, Ellipsis)): _words,
    bool: _boolean,
    float: _number,
    int: _count,
    str: _text,
}


def _parser_key(field_type: Any) -> Tuple[Any, bool]:
    """``(table key, optional)`` for a resolved field type; ``Optional[X]`` is X plus None."""
    args = typing.get_args(field_type)
    optional = typing.get_origin(field_type) is typing.Union and type(None) in args
    if optional:
        inner = [a for a in args if a is not type(None)]
        field_type = inner[0] if len(inner) == 1 else field_type
    origin = typing.get_origin(field_type)
    if origin is not None:
        return (origin, typing.get_args(field_type)), optional
    return field_type, optional


@functools.cache
def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(section: str, key: str, value: Any, cls: type, where: str) -> Any:
    """Parse one setting's loose value (TOML or a variable's text) into its field's type.

    An empty string for an optional setting means "not set" (``None``).
    """
    table_key, optional = _parser_key(_field_types(cls)[key])
    parser = _PARSERS.get(table_key)
    if parser is None:  # pragma: no cover - a new setting type needs a parser
        raise ConfigError(f"{where}: {section}.{key}: unsupported setting type")
    if optional and value == "":
        return None
    try:
        return parser(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}: {setting(f'{section}.{key}')}: {exc}") from None


def _apply(config: Config, section: str, values: Mapping[str, Any], where: str) -> Config:
    cls = _SECTIONS[section]
    known = {f.name for f in fields(cls)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {section}.{key}")
        changes[key] = _coerce(section, key, value, cls, where)
    return replace(config, **{section: replace(getattr(config, section), **changes)})


def _validate(config: Config) -> Config:
    if config.renewal.on_failure not in ("keep", "stop"):
        raise ConfigError(f"{setting('renewal.on_failure')} must be 'keep' or 'stop'")
    if not 0.1 <= config.renewal.fraction <= 0.95:
        raise ConfigError("renewal.fraction must be between 0.1 and 0.95")
    if not 0 <= config.server.deadline_s < float("inf"):
        raise ConfigError(f"{setting('server.deadline_s')} must be a number of seconds >= 0 "
                          "(0: no limit)")
    if config.broker.identity not in ("registered", "condor"):
        raise ConfigError(f"{setting('broker.identity')} must be 'registered' or 'condor'")
    if not config.broker.reconcile_s > 0:
        raise ConfigError(f"{setting('broker.reconcile_s')} must be a number of seconds > 0")
    if config.token.mytoken_file and config.token.mytoken_env:
        raise ConfigError(f"set {setting('token.mytoken_file')} or "
                          f"{setting('token.mytoken_env')}, not both")
    return config


def _read_toml(file_path: Path) -> Dict[str, Any]:
    """The parsed config file; every way it can fail is a one-line ``ConfigError``."""
    # imported here: most job processes read no file, and the waiting one stays small
    if sys.version_info >= (3, 11):
        import tomllib  # novermin (guarded by the version check)
    else:  # pragma: no cover - exercised on EL9's Python 3.9
        import tomli as tomllib
    try:
        return tomllib.loads(file_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {file_path} does not exist (named by --config or $JOBTOKEN_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {file_path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc


def _from_file(config: Config, file_path: Path) -> Config:
    for section, values in _read_toml(file_path).items():
        if section not in _SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{file_path}: unknown section [{section}]")
        config = _apply(config, section, values, str(file_path))
    return replace(config, source=str(file_path))


def _from_flags(config: Config, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
    for section, values in overrides.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            config = _apply(config, section, given, "command line")
    return config


def load_config(
    path: Optional[str] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Config:
    """Build the settings from file, environment and command-line overrides.

    Args:
        path: explicit config file (must exist); else ``$JOBTOKEN_CONFIG`` (must
            exist), else the system file if present.
        overrides: ``{section: {key: value}}`` from command-line flags; ``None``
            values mean "flag not given".

    Raises:
        ConfigError: unreadable or malformed file, unknown key, bad value.
    """
    environ = os.environ if env is None else env
    config = Config()
    chosen = path or environ.get("JOBTOKEN_CONFIG")
    file_path = Path(chosen) if chosen else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file()
                                             else None)
    if file_path is not None:
        config = _from_file(config, file_path)
    for var, (section, key) in _ENV.items():
        if var in environ:
            config = _apply(config, section, {key: environ[var]}, f"${var}")
    return _validate(_from_flags(config, overrides or {}))

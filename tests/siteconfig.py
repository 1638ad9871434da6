"""The site configuration files (``jobtoken.toml``) the tests and the benchmarks write.

Why one place: the broker tests and ``benchmarks/broker.py`` each spelled out the same
broker site (a loopback dev server, a parent mytoken file, one VO scope and audience, a
socket and a state directory); a setting renamed in ``_config`` would have been fixed in
one copy and left broken in the other.

Must NOT: import the product or pytest (``benchmarks/broker.py`` imports it as a plain
script), or write a secret: the parent mytoken is only named by its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Union

__all__ = ["broker_site_config", "config_text", "loopback_site"]


def config_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML for ``{section: {setting: value}}``; strings, numbers, booleans and lists of
    them are written as JSON, which TOML reads the same way. ``None`` leaves a setting out."""
    lines = []
    for name, settings in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()
                  if value is not None]
    return "\n".join(lines) + "\n"


def loopback_site(
    *, url: str, parent: Union[str, Path, None], scope: str, audience: str, lifetime_s: float,
    timeout_s: float,
) -> Dict[str, Dict[str, Any]]:
    """The ``[server]`` and ``[site]`` sections of a site whose Mytoken server is a dev
    server on loopback (plain http), jobs limited to VO ``vo``, ``scope`` and ``audience``."""
    return {
        "server": {"url": url, "allow_http": True, "timeout_s": timeout_s},
        "site": {
            "parent_mytoken_file": None if parent is None else str(parent),
            "vo": "vo",
            "allowed_scopes": [scope],
            "allowed_audiences": [audience],
            "expected_at_lifetime_s": lifetime_s,
        },
    }


def broker_site_config(
    *,
    url: str,
    parent: Union[str, Path, None],
    scope: str,
    audience: str,
    lifetime_s: float,
    margin_s: float,
    socket: str,
    state_dir: Union[str, Path],
    timeout_s: float,
    metrics_dir: Union[str, Path, None] = None,
    **broker: Any,
) -> str:
    """A node broker's ``loopback_site``; ``broker`` adds ``[broker]`` settings
    (``reconcile_s``, ``workers``); ``metrics_dir`` the broker's Prometheus textfiles."""
    return config_text({
        **loopback_site(url=url, parent=parent, scope=scope, audience=audience,
                        lifetime_s=lifetime_s, timeout_s=timeout_s),
        "renewal": {"margin_s": margin_s,
                    "metrics_dir": None if metrics_dir is None else str(metrics_dir)},
        "broker": {"socket": socket, "state_dir": str(state_dir), **broker},
    })

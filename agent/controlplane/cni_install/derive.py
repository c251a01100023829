"""Derive Pinion's conflist from the primary network config: pure, no filesystem.

`derive` takes the primary's file name and text and returns either the conflist to write
(the primary with `pinion-cni` appended and Pinion's marker added) or a `Refusal` saying,
with the file name, why no config can be derived from it.

The marker is a top-level `"pinion"` object. Runtimes ignore it: libcni reads a conflist
into a map and takes only the keys it knows (name, cniVersion, cniVersions, disableCheck,
disableGC, loadOnlyInlinedPlugins, plugins), and each plugin is handed only its own object
with name/cniVersion/prevResult/runtimeConfig injected, so list-level keys never reach a
plugin.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PLUGIN_TYPE = "pinion-cni"
# The versions cni/pinion-cni accepts (its SUPPORTED_VERSIONS; a unit test keeps them in
# step). A runtime hands every plugin the list's cniVersion, so a conflist in a version the
# plugin rejects (1.1.0 today) would stop every pod on the node: such primaries are refused.
SUPPORTED_CNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
MARKER_KEY = "pinion"
MANAGED_BY = "pinion cni install"
# Go's encoding/json (libcni) cannot hold a number beyond float64; refuse rather than copy it.
_MAX_INTEGER_DIGITS = 300


@dataclass(frozen=True)
class DerivedConfig:
    """Our conflist, ready to write: the primary's plugins, then pinion-cni."""

    derived_from: str
    network_name: str
    cni_version: str
    plugin_types: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Refusal:
    """Why no config can be derived from a file; `str()` is the one-line message."""

    file_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file_name}: {self.reason}"


class _Invalid(Exception):
    """A validation failure inside `derive`; becomes a Refusal."""


def derive(
    primary_name: str, primary_text: str, plugin_options: Mapping[str, Any]
) -> DerivedConfig | Refusal:
    """The primary config with pinion-cni appended, or why that cannot be done."""
    try:
        document = parse_json(primary_text)
        conflist = as_conflist(primary_name, document)
        plugins = validate_conflist(conflist)
    except _Invalid as invalid:
        return Refusal(primary_name, str(invalid))
    derived = dict(conflist)
    options = {key: value for key, value in plugin_options.items() if key != "type"}
    derived["plugins"] = [*plugins, {"type": PLUGIN_TYPE, **options}]
    derived[MARKER_KEY] = {
        "managedBy": MANAGED_BY,
        "derivedFrom": primary_name,
        "sha256": hashlib.sha256(primary_text.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    return DerivedConfig(
        derived_from=primary_name,
        network_name=conflist["name"],
        cni_version=conflist["cniVersion"],
        plugin_types=(*(plugin["type"] for plugin in plugins), PLUGIN_TYPE),
        text=json.dumps(derived, indent=2, ensure_ascii=True, allow_nan=False) + "\n",
    )


def parse_json(text: str) -> Any:
    """Strict JSON as Go reads it: no NaN/Infinity, no numbers beyond float64."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except RecursionError:
        raise _Invalid("is not usable JSON: nested too deeply") from None
    except ValueError as error:
        raise _Invalid(f"is not valid JSON ({error})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _bounded_int(literal: str) -> int:
    if len(literal) > _MAX_INTEGER_DIGITS:
        raise ValueError(f"integer with {len(literal)} digits is out of range")
    return int(literal)


def as_conflist(file_name: str, document: Any) -> dict[str, Any]:
    """A `.conflist` as is; a `.conf`/`.json` (one plugin) wrapped as libcni does."""
    if not isinstance(document, dict):
        raise _Invalid(f"is not a JSON object (found {type(document).__name__})")
    if MARKER_KEY in document:
        raise _Invalid(f'carries Pinion\'s "{MARKER_KEY}" marker: it is a derived config, '
                       "not a primary")
    if file_name.endswith(".conflist"):
        return document
    if "plugins" in document:
        raise _Invalid('is a single-plugin config (.conf/.json) but has "plugins"; '
                       "a plugin list belongs in a .conflist file")
    plugin = {key: value for key, value in document.items() if key not in ("name", "cniVersion")}
    wrapped = {key: document[key] for key in ("cniVersion", "name") if key in document}
    wrapped["plugins"] = [plugin]
    return wrapped


def validate_conflist(conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Checks name, cniVersion(s) and plugins; returns the plugins."""
    name = conflist.get("name")
    if not isinstance(name, str) or not name:
        raise _Invalid('has no network "name" (a non-empty string)')
    validate_version(conflist.get("cniVersion"))
    if "cniVersions" in conflist:
        versions = conflist["cniVersions"]
        if not isinstance(versions, list):
            raise _Invalid('"cniVersions" is not a list')
        for version in versions:
            validate_version(version, key="cniVersions entry")
    return validate_plugins(conflist.get("plugins"))


def validate_version(version: Any, key: str = "cniVersion") -> None:
    supported = ", ".join(SUPPORTED_CNI_VERSIONS)
    if version is None:
        raise _Invalid(f'has no "cniVersion" (pinion-cni supports {supported})')
    if version not in SUPPORTED_CNI_VERSIONS:
        raise _Invalid(f"{key} {json.dumps(version)[:40]} is not one pinion-cni supports "
                       f"({supported})")


def validate_plugins(plugins: Any) -> list[dict[str, Any]]:
    if not isinstance(plugins, list) or not plugins:
        raise _Invalid('has no plugins ("plugins" must be a non-empty list)')
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise _Invalid(f"plugin {index} is not a JSON object")
        plugin_type = plugin.get("type")
        if not isinstance(plugin_type, str) or not plugin_type:
            raise _Invalid(f'plugin {index} has no "type" (a non-empty string)')
        if plugin_type == PLUGIN_TYPE:
            raise _Invalid(f"already contains {PLUGIN_TYPE} (plugin {index}); Pinion never "
                           "appends itself twice: remove it from this file and let "
                           "`pinion cni install` derive its own config")
    return plugins


def marker_of(text: str) -> dict[str, Any] | None:
    """Pinion's marker if `text` is a config we derived, else None (never raises)."""
    try:
        document = parse_json(text)
    except _Invalid:
        return None
    marker = document.get(MARKER_KEY) if isinstance(document, dict) else None
    if isinstance(marker, dict) and marker.get("managedBy") == MANAGED_BY:
        return marker
    return None

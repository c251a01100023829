"""A minimal CNI runtime: runs a plugin chain (ADD, DEL, CHECK) the way libcni does.

It owns executing plugin binaries with the CNI environment and the per-plugin config on
stdin, optionally inside a named network namespace (a node's host side), and turning
every failure into a `CniError`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BIN_DIRS = ("/usr/lib/cni",)

RUNTIME_ERROR_CODE = 999
"""Code of errors raised by the runtime itself: plugin missing, timeout, unreadable output.

It is CNI's `ErrInternal` (999), the code libcni's skel also uses for untyped plugin errors.
"""

INCOMPATIBLE_VERSION_CODE = 1
_VERSIONS_WITHOUT_CHECK = frozenset({"0.1.0", "0.2.0", "0.3.0", "0.3.1"})


RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CniError(Exception):
    """A CNI plugin (or the runtime running it) reported an error."""

    def __init__(self, code: int, msg: str, details: str = "", plugin: str = "") -> None:
        super().__init__(code, msg, details, plugin)
        self.code = code
        self.msg = msg
        self.details = details
        self.plugin = plugin

    def __str__(self) -> str:
        text = f"CNI plugin {self.plugin or '?'}: {self.msg} (code {self.code})"
        return f"{text}: {self.details}" if self.details else text


@dataclass(frozen=True)
class _Request:
    """The per-invocation inputs that do not depend on the plugin."""

    container_id: str
    netns_path: str
    ifname: str
    args: Mapping[str, str]


class CniRuntime:
    """Executes CNI plugin chains; plugins may run inside a named network namespace."""

    def __init__(
        self,
        bin_dirs: Sequence[str] | None = None,
        run_in_netns: str | None = None,
        env_extra: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.bin_dirs = list(bin_dirs) if bin_dirs is not None else list(DEFAULT_BIN_DIRS)
        self.run_in_netns = run_in_netns
        self.env_extra = dict(env_extra or {})
        self.timeout = timeout

    def add(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns_path: str,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run ADD through the chain; on failure run DEL for the whole chain, then raise."""
        request = _Request(container_id, netns_path, ifname, dict(args or {}))
        plugins = _plugins(conflist)
        result: dict[str, Any] | None = None
        try:
            for plugin in plugins:
                result = self._invoke("ADD", conflist, plugin, request, result)
        except CniError as error:
            self._undo_failed_add(conflist, request, error)
            raise
        assert result is not None  # _invoke("ADD") always returns a result
        return result

    def delete(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns_path: str,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
        prev_result: Mapping[str, Any] | None = None,
    ) -> None:
        """Run DEL in reverse order through every plugin; raise the first error at the end."""
        request = _Request(container_id, netns_path, ifname, dict(args or {}))
        errors: list[CniError] = []
        for plugin in reversed(_plugins(conflist)):
            try:
                self._invoke("DEL", conflist, plugin, request, prev_result)
            except CniError as error:
                errors.append(error)
        if errors:
            for later in errors[1:]:
                errors[0].add_note(f"also failed: {later}")
            raise errors[0]

    def check(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns_path: str,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
        prev_result: Mapping[str, Any] | None = None,
    ) -> None:
        """Run CHECK in order; every plugin gets the cached final ADD result."""
        if prev_result is None:
            raise ValueError("CHECK needs the cached result of ADD as prev_result")
        version = str(conflist.get("cniVersion", ""))
        if version in _VERSIONS_WITHOUT_CHECK:
            raise CniError(INCOMPATIBLE_VERSION_CODE, f"CHECK is not supported by {version}")
        if conflist.get("disableCheck"):
            return
        request = _Request(container_id, netns_path, ifname, dict(args or {}))
        for plugin in _plugins(conflist):
            self._invoke("CHECK", conflist, plugin, request, prev_result)

    def _undo_failed_add(self, conflist: Mapping[str, Any], request: _Request, error: CniError) -> None:
        try:
            self.delete(conflist, request.container_id, request.netns_path, request.ifname, request.args)
        except CniError as cleanup_error:
            error.add_note(f"DEL after the failed ADD also failed: {cleanup_error}")

    def _invoke(
        self,
        command: str,
        conflist: Mapping[str, Any],
        plugin: Mapping[str, Any],
        request: _Request,
        prev_result: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        """Execute one plugin for one command; returns its result for ADD."""
        plugin_type = str(plugin.get("type", ""))
        executable = self._find(plugin)
        config = _plugin_config(conflist, plugin, prev_result)
        argv = [executable]
        if self.run_in_netns is not None:
            argv = ["ip", "netns", "exec", self.run_in_netns, executable]
        try:
            completed = subprocess.run(
                argv,
                input=json.dumps(config).encode(),
                capture_output=True,
                env=self._environment(command, request),
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise CniError(
                RUNTIME_ERROR_CODE, f"{command} timed out after {self.timeout}s", plugin=plugin_type
            ) from error
        except OSError as error:
            raise CniError(
                RUNTIME_ERROR_CODE, f"cannot execute {executable}: {error}", plugin=plugin_type
            ) from error
        if completed.stderr:
            log.debug(
                "%s %s stderr: %s", plugin_type, command, completed.stderr.decode(errors="replace").strip()
            )
        if completed.returncode != 0:
            raise _plugin_error(plugin_type, completed)
        return _parse_result(plugin_type, completed.stdout) if command == "ADD" else None

    def _find(self, plugin: Mapping[str, Any]) -> str:
        """The plugin's executable: its "_path" if given, else `type` looked up in bin_dirs."""
        plugin_type = str(plugin.get("type", ""))
        if "_path" in plugin:
            return str(plugin["_path"])
        if plugin_type and "/" not in plugin_type:
            for directory in self.bin_dirs:
                candidate = Path(directory) / plugin_type
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return str(candidate)
        raise CniError(
            RUNTIME_ERROR_CODE,
            f"failed to find plugin {plugin_type!r} in path {self.bin_dirs}",
            plugin=plugin_type,
        )

    def _environment(self, command: str, request: _Request) -> dict[str, str]:
        return {
            # What a container runtime gives its plugins: a system PATH, not the caller's
            # (a pyenv shim in front of python3 would triple the plugin's start-up).
            "PATH": RUNTIME_PATH,
            **self.env_extra,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": request.container_id,
            "CNI_NETNS": request.netns_path,
            "CNI_IFNAME": request.ifname,
            "CNI_ARGS": ";".join(f"{key}={value}" for key, value in request.args.items()),
            "CNI_PATH": os.pathsep.join(self.bin_dirs),
        }


def _plugins(conflist: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CniError(RUNTIME_ERROR_CODE, "the conflist has no plugins")
    return plugins


def _plugin_config(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The config one plugin reads on stdin: its own keys plus the conflist's identity."""
    config = {key: value for key, value in plugin.items() if key != "_path"}
    config["cniVersion"] = conflist.get("cniVersion", "1.0.0")
    config["name"] = conflist.get("name", "")
    if prev_result is not None:
        config["prevResult"] = prev_result
    return config


def _plugin_error(plugin_type: str, completed: subprocess.CompletedProcess[bytes]) -> CniError:
    """Turn a failed plugin run into a CniError, from its error JSON when it printed one."""
    stdout = completed.stdout.decode(errors="replace")
    stderr = completed.stderr.decode(errors="replace")
    try:
        reported = json.loads(stdout)
    except ValueError:
        reported = None
    if isinstance(reported, dict) and "code" in reported:
        try:
            code = int(reported["code"])
        except (TypeError, ValueError):
            code = RUNTIME_ERROR_CODE
        return CniError(code, str(reported.get("msg", "")), str(reported.get("details", "")), plugin_type)
    details = "\n".join(part.strip() for part in (stdout, stderr) if part.strip())
    return CniError(
        RUNTIME_ERROR_CODE, f"plugin exited with status {completed.returncode}", details, plugin_type
    )


def _parse_result(plugin_type: str, stdout: bytes) -> dict[str, Any]:
    try:
        result = json.loads(stdout)
    except ValueError as error:
        raise CniError(
            RUNTIME_ERROR_CODE,
            "plugin printed no valid result JSON",
            stdout.decode(errors="replace"),
            plugin_type,
        ) from error
    if not isinstance(result, dict):
        raise CniError(
            RUNTIME_ERROR_CODE,
            "plugin result is not a JSON object",
            stdout.decode(errors="replace"),
            plugin_type,
        )
    return result

"""Install, keep in step and uninstall Pinion's CNI config and plugin on a host.

`reconcile` makes the conf dir hold our conflist derived from the current primary (and the
plugin binary present) or says why it cannot; `uninstall` removes exactly what we added;
`watch` reconciles whenever the conf dir changes, until asked to stop.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.controlplane.cni_install import files
from agent.controlplane.cni_install.derive import PLUGIN_TYPE, DerivedConfig, Refusal, derive
from agent.controlplane.cni_install.layout import (
    OWN_NAMES,
    ConfDirScan,
    HostLayout,
    choose_own_name,
    read_config_bytes,
    scan_conf_dir,
)
from agent.controlplane.cni_install.watch import ChangeSource, StopSignal, Wake

log = logging.getLogger(__name__)

CONFIG_MODE = 0o644  # configs hold no secrets; runtimes and admins read them
PLUGIN_MODE = 0o755


class Status(enum.Enum):
    INSTALLED = "installed"  # something was written or removed to get in step
    UNCHANGED = "unchanged"  # already in step
    REMOVED = "removed"  # uninstall finished (possibly with nothing to remove)
    NO_PRIMARY = "no-primary"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    status: Status
    message: str

    @property
    def ok(self) -> bool:
        return self.status in (Status.INSTALLED, Status.UNCHANGED, Status.REMOVED)


@dataclass(frozen=True)
class InstallSettings:
    """Everything reconcile needs, read once by the caller."""

    layout: HostLayout
    plugin: bytes  # the pinion-cni executable to install
    plugin_options: Mapping[str, Any]  # agentSocket, failPolicy: our entry in the conflist
    socket_directory: Path | None = None  # the agent socket's dir on the host, made 0700


def reconcile(settings: InstallSettings) -> Outcome:
    """Bring the host in step with its current primary config, or say why not."""
    conf_dir = settings.layout.conf_dir
    try:
        scan = scan_conf_dir(conf_dir)
    except FileNotFoundError:
        return Outcome(Status.NO_PRIMARY,
                       f"no primary CNI config in {conf_dir} yet (the directory does not exist)")
    except OSError as error:
        return Outcome(Status.FAILED, f"cannot read CNI conf dir {conf_dir}: {error}")
    try:
        if scan.primary is None:
            return _without_primary(scan)
        plan = plan_config(conf_dir, scan.primary, settings.plugin_options)
        if isinstance(plan, Refusal):
            return _refused(scan, plan)
        return _apply(settings, scan, *plan)
    except OSError as error:
        return Outcome(Status.FAILED, f"installing into {conf_dir} failed: {error}")


def plan_config(
    conf_dir: Path, primary: str, plugin_options: Mapping[str, Any]
) -> tuple[str, DerivedConfig] | Refusal:
    """Our file name and contents for `primary`, or why there are none."""
    own_name = choose_own_name(primary)
    if own_name is None:
        return Refusal(primary, f"sorts before every name Pinion can use ({', '.join(OWN_NAMES)}), "
                                "so the runtime would use it, never ours, and pods would start "
                                f"without pinion-cni; rename it to sort after {OWN_NAMES[-1]}")
    try:
        text = read_config_bytes(conf_dir / primary).decode("utf-8")
    except OSError as error:
        return Refusal(primary, f"cannot be read ({error.strerror or error})")
    except UnicodeDecodeError:
        return Refusal(primary, "is not UTF-8 text")
    except ValueError as error:
        return Refusal(primary, f"is not a plausible CNI config ({error})")
    derived = derive(primary, text, plugin_options)
    return derived if isinstance(derived, Refusal) else (own_name, derived)


def _apply(settings: InstallSettings, scan: ConfDirScan, own_name: str,
           derived: DerivedConfig) -> Outcome:
    """Plugin first, then our config, then stale configs of ours: never a dangling config."""
    done = []
    if settings.socket_directory and files.ensure_private_directory(settings.socket_directory):
        done.append(f"created {settings.socket_directory} (0700)")
    plugin_path = settings.layout.plugin_path()
    if not plugin_path.parent.is_dir():
        raise FileNotFoundError(f"CNI bin dir {plugin_path.parent} does not exist (see --bin-dir)")
    if files.ensure_file(plugin_path, settings.plugin, PLUGIN_MODE):
        done.append(f"installed {plugin_path}")
    if files.ensure_file(scan.directory / own_name, derived.text.encode(), CONFIG_MODE):
        done.append(f"wrote {own_name}")
    for stale in sorted(set(scan.own) - {own_name}):
        if files.remove_file(scan.directory / stale):
            done.append(f"removed stale {stale}")
    summary = (f"{scan.directory / own_name}: {derived.derived_from} + {PLUGIN_TYPE} "
               f"(network {derived.network_name!r}, cniVersion {derived.cni_version}, "
               f"plugins {' -> '.join(derived.plugin_types)})")
    if not done:
        return Outcome(Status.UNCHANGED, f"{summary}; already in step")
    return Outcome(Status.INSTALLED, f"{summary}; {'; '.join(done)}")


def _without_primary(scan: ConfDirScan) -> Outcome:
    """No primary: write nothing; a config of ours must not outlive the one it copies."""
    message = f"no primary CNI config in {scan.directory} yet"
    removed = [name for name in sorted(scan.own) if files.remove_file(scan.directory / name)]
    if removed:
        message += f"; removed {', '.join(removed)} (its primary is gone)"
    return Outcome(Status.NO_PRIMARY, message)


def _refused(scan: ConfDirScan, refusal: Refusal) -> Outcome:
    """A refusal writes nothing; an earlier derived config stays as the last good one."""
    if not scan.own:
        return Outcome(Status.REFUSED, f"{refusal}; nothing written")
    kept = ", ".join(f"{name} (derived from {marker.get('derivedFrom')})"
                     for name, marker in sorted(scan.own.items()))
    return Outcome(Status.REFUSED, f"{refusal}; kept {kept} as the last good config")


def uninstall(layout: HostLayout, plugin: bytes | None) -> Outcome:
    """Remove our configs (by marker) and the plugin if it is ours and unused; idempotent."""
    try:
        scan = scan_conf_dir(layout.conf_dir)
    except FileNotFoundError:
        scan = ConfDirScan(layout.conf_dir)
    except OSError as error:
        return Outcome(Status.FAILED, f"cannot read CNI conf dir {layout.conf_dir}: {error}")
    try:
        removed = [str(scan.directory / name) for name in sorted(scan.own)
                   if files.remove_file(scan.directory / name)]
        plugin_removed, note = _uninstall_plugin(layout.plugin_path(), plugin, scan)
    except OSError as error:
        return Outcome(Status.FAILED, f"uninstall failed: {error}")
    removed += [plugin_removed] if plugin_removed else []
    message = f"removed {', '.join(removed)}" if removed else "nothing of Pinion's to remove"
    return Outcome(Status.REMOVED, message + (f"; {note}" if note else ""))


def _uninstall_plugin(path: Path, plugin: bytes | None, scan: ConfDirScan) -> tuple[str, str]:
    """Remove the plugin binary if it is byte-identical to ours and no config uses it."""
    try:
        installed = path.read_bytes()
    except FileNotFoundError:
        return "", ""
    if plugin is None:
        return "", f"left {path}: the plugin to compare it with could not be read"
    if installed != plugin:
        return "", f"left {path}: it is not the plugin this installer ships"
    users = [name for name in scan.others if _mentions_plugin(scan.directory / name)]
    if users:
        return "", f"left {path}: {', '.join(users)} still uses it"
    return (str(path), "") if files.remove_file(path) else ("", "")


def _mentions_plugin(path: Path) -> bool:
    try:
        return f'"{PLUGIN_TYPE}"'.encode() in read_config_bytes(path)
    except (OSError, ValueError):
        return False


def watch(settings: InstallSettings, source: ChangeSource, stop: StopSignal, *,
          resync_seconds: float = 60.0, uninstall_on_exit: bool | Callable[[], bool] = False) -> None:
    """Reconcile now and on every change (and every `resync_seconds`) until `stop`.
    `uninstall_on_exit`: a bool, or asked at exit (a DaemonSet rollout keeps the chain)."""
    log.info("watching %s (%s)", settings.layout.conf_dir, source.description)
    previous = _report(reconcile(settings), None)
    while (wake := source.wait(stop, resync_seconds)) is not Wake.STOPPED:
        log.debug("conf dir %s: reconciling", wake.value)
        previous = _report(reconcile(settings), previous)
    log.info("stop requested")
    if uninstall_on_exit if isinstance(uninstall_on_exit, bool) else uninstall_on_exit():
        _report(uninstall(settings.layout, settings.plugin), None)


def _report(outcome: Outcome, previous: Outcome | None) -> Outcome:
    """Log an outcome once: a repeated refusal or wait is not logged again."""
    if outcome == previous or (outcome.status is Status.UNCHANGED and previous is not None):
        log.debug("%s", outcome.message)
    elif outcome.status in (Status.REFUSED, Status.FAILED):
        log.error("%s", outcome.message)
    elif outcome.status is Status.NO_PRIMARY:  # the watch waits for one
        log.warning("%s; waiting for one", outcome.message)
    else:
        log.info("%s", outcome.message)
    return outcome

"""`pinion cni install` / `pinion cni uninstall`: put pinion-cni into the node's CNI chain.

Run by the DaemonSet with the host's directories mounted. The installer never edits the
primary network config (k3s rewrites `10-flannel.conflist` on every start): it writes its
**own** conflist, named to sort first so the runtime picks it, holding a copy of the
primary's plugins with pinion-cni appended, and re-derives it whenever the primary changes.

- derive.py: primary text -> our conflist, or a Refusal (pure, no filesystem).
- layout.py: host layout detection (k3s, standard), which config is the primary.
- files.py: temp-file + rename writes, fsync'd; removals.
- watch.py: inotify (ctypes) or polling change sources, the stop signal.
- installer.py: reconcile / uninstall / watch.

Host plumbing and file modes. The plugin needs no kubeconfig and no credentials: it only
talks to the agent over a Unix socket. So the installer writes no secrets:
- `<bin>/pinion-cni`: mode 0755, owned by the installer's user (root in the DaemonSet);
- our conflist: mode 0644 (it holds socket paths and a fail policy, nothing secret);
- the agent socket's directory (default `/run/pinion`): created mode 0700 if missing, so
  only root (the runtime running the plugin, and the agent) can reach the socket; an
  existing directory is left as it is, and uninstall leaves it (the agent shares it).
"""

from agent.controlplane.cni_install.derive import (
    PLUGIN_TYPE,
    SUPPORTED_CNI_VERSIONS,
    DerivedConfig,
    Refusal,
    derive,
)
from agent.controlplane.cni_install.installer import (
    InstallSettings,
    Outcome,
    Status,
    reconcile,
    uninstall,
    watch,
)
from agent.controlplane.cni_install.layout import OWN_NAMES, HostLayout, detect_layout
from agent.controlplane.cni_install.watch import (
    InotifySource,
    PollingSource,
    StopSignal,
    make_change_source,
)

__all__ = [
    "OWN_NAMES",
    "PLUGIN_TYPE",
    "SUPPORTED_CNI_VERSIONS",
    "DerivedConfig",
    "HostLayout",
    "InotifySource",
    "InstallSettings",
    "Outcome",
    "PollingSource",
    "Refusal",
    "Status",
    "StopSignal",
    "derive",
    "detect_layout",
    "make_change_source",
    "reconcile",
    "uninstall",
    "watch",
]

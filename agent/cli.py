"""The `pinion` command: agent, rules, demo, cni, identity, issuer, install, and stat, edges, top, check."""

from __future__ import annotations

import signal
import sys


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# As a container's PID 1 a signal without a handler is ignored: a SIGTERM that comes while
# we start (the imports take a few hundred ms) would wait out the grace period and end in
# SIGKILL. Until a command installs its own handling, SIGTERM exits at once. Set before the
# imports below, and only here: the CLI is the process's entry point — except in a test
# run that imports it, whose SIGTERM must stop the run, not fail the test at hand.
if "pytest" not in sys.modules:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Coroutine, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from agent.config import REDIRECT_MODES, Config, Ports  # noqa: E402
from agent.model import CaptureSettings  # noqa: E402

if TYPE_CHECKING:
    from agent.controlplane.cni_install import HostLayout, InstallSettings

_AGENT_FLAGS = ("node_name", "admin_addr", "cni_socket", "identity_dir", "state_dir",
                "redirect", "pending_dir", "log_level", "probe_sources", "tls_ciphers",
                "certificate_lifetime", "mesh_networks", "bpf_dir", "bpf_object",
                "issuer_url", "issuer_id", "token_file", "trust_bundle", "trust_domain",
                "pod_uid", "tunnel_syn_rate", "bpf_max_pods", "bpf_max_connections",
                "sweep_interval_seconds", "relay_idle_timeout_seconds", "keeper_socket",
                "drain_seconds", "max_connections", "gateway_identities", "tap_token_file",
                "max_taps")


# The commands this module's parser defines itself: run as one of them (the agent, the issuer,
# the keeper: long-lived processes on every node), the process never builds the parsers of
# the viz and multicluster commands, nor imports their modules (docs/benchmarks.md, idle RSS).
_OWN_COMMANDS = frozenset({"agent", "rules", "demo", "keeper", "cni", "identity", "issuer",
                           "install"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; given the command being run, only what that command needs."""
    parser = argparse.ArgumentParser(prog="pinion", description=__doc__)
    sub = parser.add_subparsers(metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the node agent (standalone, or watching Kubernetes)")
    agent.add_argument("--node-name", help="this node's name (required; or PINION_NODE_NAME)")
    agent.add_argument("--admin-addr", help="IP:PORT of the admin endpoint (default 127.0.0.1:4191)")
    agent.add_argument("--cni-socket", help="Unix socket for pinion-cni (default /run/pinion/cni.sock)")
    agent.add_argument("--identity-dir",
                       help="trust bundle + issuer (`pinion identity init`): this agent issues "
                            "its pods' certificates and runs the mTLS mesh tunnel on 15008")
    agent.add_argument("--tls-ciphers", metavar="chacha20|aes|SUITES",
                       help="TLS 1.3 suite preference (default: by the CPU's AES instructions)")
    agent.add_argument("--certificate-lifetime", metavar="SECONDS",
                       help="workload certificate lifetime (default 86400; renewed at half-life)")
    agent.add_argument("--mesh-networks", metavar="CIDR,CIDR",
                       help="where meshed pods may be; only there is 15008 tried (default: "
                            "RFC 1918 and 100.64.0.0/10)")
    agent.add_argument("--state-dir", help="where captured pods are remembered (default /var/lib/pinion)")
    agent.add_argument("--pending-dir",
                       help="where a fail-open plugin spools ADDs (default /run/pinion/pending)")
    agent.add_argument("--redirect", choices=REDIRECT_MODES, help="capture backend (default auto)")
    agent.add_argument("--probe-sources", metavar="IP,IP",
                       help="addresses kubelet probes come from, never captured, besides each "
                            "pod's gateway (e.g. a SNAT address)")
    agent.add_argument("--sweep-interval-seconds", metavar="S",
                       help="how often pods whose netns vanished without a CNI DEL are released, "
                            "idle tunnels closed and spooled ADDs replayed (default 10)")
    agent.add_argument("--relay-idle-timeout-seconds", metavar="S",
                       help="a relayed connection with no byte either way this long is reset "
                            "(default 3600; per pod: PINION_IDLE_TIMEOUT or pinion.dev/idle-timeout)")
    agent.add_argument("--keeper-socket", metavar="PATH",
                       help="the socket keeper (`pinion keeper`) that holds the pods' listeners "
                            "across agent restarts: connections wait instead of being refused")
    agent.add_argument("--drain-seconds", metavar="S",
                       help="on SIGTERM, stop accepting and let connections in flight finish "
                            "within this (default 20; HTTP/1 ones close after their response)")
    agent.add_argument("--max-connections", metavar="N",
                       help="relayed connections the agent holds at once, all pods together; "
                            "past it, listeners stop accepting and tunnel streams are refused "
                            "until a quarter are done (default 0: what the memory cgroup's "
                            "limit leaves room for, ~24 KiB each; 4096 without a limit)")
    agent.add_argument("--tunnel-syn-rate", metavar="N",
                       help="new connections per second one address may open to a pod's 15008 "
                            "before the kernel drops its SYNs (burst 2N; default 50, 0 = no limit)")
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    agent.add_argument("--tap-token-file", metavar="PATH",
                       help="standalone: a caller presenting this file's token may tap from "
                            "another host (from this node tap needs no token)")
    agent.add_argument("--max-taps", metavar="N", help="taps open at once (default 32)")
    agent.add_argument("--bpf-dir", help="bpffs directory for eBPF pins (default /sys/fs/bpf/pinion)")
    agent.add_argument("--bpf-object", help="compiled eBPF capture object (default bpf/capture.o)")
    agent.add_argument("--bpf-max-pods", metavar="N",
                       help="meshed pods the eBPF maps hold (default 256; k3s allows 110 a node)")
    agent.add_argument("--bpf-max-connections", metavar="N",
                       help="outbound connects in flight the eBPF maps hold (default 8192)")
    kube = agent.add_argument_group("Kubernetes mode (docs/kubernetes.md)")
    kube.add_argument("--kubeconfig", metavar="PATH",
                      help="watch this cluster (default: in-cluster config when run in a pod)")
    kube.add_argument("--standalone", action="store_true",
                      help="no Kubernetes, even in a pod: the CNI args say everything")
    kube.add_argument("--issuer-url", metavar="URL", help="where CSRs go "
                      "(default https://pinion-issuer.pinion-system.svc:8443)")
    kube.add_argument("--issuer-id", metavar="SPIFFE", help="who the issuer must prove to be")
    kube.add_argument("--token-file", metavar="PATH",
                      help="projected service-account token (default /var/run/secrets/pinion/token)")
    kube.add_argument("--trust-bundle", metavar="PATH", help="the mounted trust bundle "
                      "(default /var/run/pinion/trust-bundle/trust-bundle.crt)")
    kube.add_argument("--trust-domain", metavar="TD", help="default cluster.local")
    agent.add_argument("--gateway-identities", metavar="SPIFFE,SPIFFE",
                       help="this cluster's multicluster gateways: streams they forward count "
                            "as from the linked cluster's caller, for policy and metrics")
    agent.add_argument("--cleanup", action="store_true",
                       help="on shutdown remove every capture rule (uninstall) instead of "
                            "leaving pods captured for the next agent")
    agent.set_defaults(run=_run_agent)

    rules = sub.add_parser("rules", help="print the capture rules a pod would get (dry run)")
    rules.add_argument("--dry-run", action="store_true", required=True)
    rules.add_argument("--backend", choices=("iptables", "nftables"), default="nftables")
    rules.add_argument("--probe-source", action="append", default=[], metavar="IP")
    rules.add_argument("--exclude-outbound-ports", default="", metavar="P,P")
    rules.add_argument("--exclude-inbound-ports", default="", metavar="P,P")
    rules.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,CIDR")
    rules.set_defaults(run=_run_rules)

    demo = sub.add_parser("demo", help="build a throwaway two-node lab and show the mesh at work")
    demo.add_argument("--redirect", choices=("iptables", "nftables", "ebpf"), default="nftables")
    demo.add_argument("--requests", type=int, default=200, help="HTTP requests per client pod")
    demo.set_defaults(run=_run_demo)
    keeper = sub.add_parser("keeper", help="hold the pods' listening sockets while agents restart")
    keeper.add_argument("--socket", type=Path, default=Path("/run/pinion/keeper.sock"),
                        help="its Unix socket (default /run/pinion/keeper.sock)")
    keeper.set_defaults(run=_run_keeper)
    _add_cni_parser(sub)
    _add_identity_parser(sub)
    _add_issuer_parser(sub)
    _add_install_parser(sub)
    if command not in _OWN_COMMANDS:
        _add_viz_parsers(sub)
        _add_multicluster_parser(sub)
    return parser


def _add_cni_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cni = sub.add_parser("cni", help="put pinion-cni into this node's CNI chain, or take it out")
    actions = cni.add_subparsers(metavar="ACTION")
    install = actions.add_parser(
        "install", help="copy the plugin and write Pinion's conflist (the primary + pinion-cni)")
    _add_cni_location_flags(install)
    install.add_argument("--agent-socket", default="/run/pinion/cni.sock", metavar="PATH",
                         help="the agent's socket as the plugin sees it on the host "
                              "(default /run/pinion/cni.sock)")
    install.add_argument("--fail-policy", choices=("closed", "open"), default="closed",
                         help="closed: a pod does not start uncaptured (default)")
    install.add_argument("--watch", action="store_true",
                         help="keep Pinion's conflist in step with the primary until SIGTERM")
    install.add_argument("--poll", action="store_true", help="with --watch: poll, not inotify")
    install.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                         help="seconds between polls (default 2)")
    install.add_argument("--uninstall-on-exit", action="store_true",
                         help="with --watch: uninstall when stopped (SIGTERM/SIGINT)")
    install.add_argument("--unless-daemonset", metavar="NS/NAME",
                         help="with --uninstall-on-exit: keep the chain while this DaemonSet still "
                              "exists (a rollout or restart), asking the API (in-cluster config)")
    install.set_defaults(run=_run_cni_install)
    uninstall = actions.add_parser("uninstall", help="remove exactly what `cni install` added")
    _add_cni_location_flags(uninstall)
    uninstall.set_defaults(run=_run_cni_uninstall)


def _add_identity_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    identity = sub.add_parser("identity", help="the mesh's trust anchor and issuer (standalone mode)")
    actions = identity.add_subparsers(metavar="ACTION")
    init = actions.add_parser("init", help="write a new trust anchor + issuer into an identity dir "
                                           "(for `pinion agent --identity-dir`)")
    init.add_argument("--dir", type=Path, required=True, metavar="DIR", help="the identity dir")
    init.add_argument("--trust-domain", default="cluster.local", metavar="TD",
                      help="SPIFFE trust domain (default cluster.local)")
    init.add_argument("--force", action="store_true",
                      help="replace existing keys (every certificate issued so far stops verifying)")
    init.add_argument("--anchor-from", type=Path, metavar="DIR",
                      help="no new anchor: an issuer for --trust-domain under the anchor of this "
                           "identity dir (multicluster: linked clusters share one anchor)")
    init.set_defaults(run=_run_identity_init)


def _add_issuer_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pinion issuer`: the Kubernetes-mode certificate issuer (flags: docs/kubernetes.md)."""
    issuer = sub.add_parser("issuer", help="run the certificate issuer service (Kubernetes mode)")
    issuer.add_argument("--identity-dir", default="/var/run/pinion/issuer", metavar="DIR",
                        help="the mounted Secret pinion-issuer: issuer.crt/.key, trust-bundle.crt, "
                             "trust-domain (default /var/run/pinion/issuer)")
    issuer.add_argument("--listen", default="0.0.0.0:8443", metavar="IP:PORT",
                        help="HTTPS (TLS 1.3) for POST /v1/certificates (default 0.0.0.0:8443)")
    issuer.add_argument("--admin-addr", default="0.0.0.0:9990", metavar="IP:PORT",
                        help="/ready, /live, /metrics (default 0.0.0.0:9990)")
    issuer.add_argument("--kubeconfig", metavar="PATH",
                        help="API server and credentials (default in-cluster)")
    issuer.add_argument("--agent-service-account", default="pinion-system:pinion-agent", metavar="NS:NAME",
                        help="whose tokens may ask for certificates (default pinion-system:pinion-agent)")
    issuer.add_argument("--audience", default="pinion-issuer",
                        help="the audience agents' tokens must carry (default pinion-issuer)")
    issuer.add_argument("--bundle-configmap", default="pinion-system/pinion-trust-bundle", metavar="NS/NAME",
                        help="where the trust bundle is published at start "
                             "(default pinion-system/pinion-trust-bundle)")
    issuer.add_argument("--max-lifetime", default="86400", metavar="SECONDS",
                        help="the longest certificate lifetime granted (default 86400)")
    issuer.set_defaults(run=_run_issuer)


def _add_install_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = sub.add_parser(
        "install", help="print the Kubernetes manifests with new issuer credentials, for "
                        "`pinion install | kubectl apply -f -`")
    install.add_argument("--trust-domain", metavar="TD",
                         help="SPIFFE trust domain (default cluster.local; with --identity-dir, the dir's)")
    install.add_argument("--identity-dir", type=Path, metavar="DIR",
                         help="use the issuer and trust bundle of this `pinion identity init` dir "
                              "instead of generating them (its anchor key is not emitted)")
    install.add_argument("--image", metavar="IMAGE", help="the image of every container")
    install.add_argument("--redirect", choices=REDIRECT_MODES, help="the agents' capture backend")
    install.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    install.add_argument("--node-cidr", action="append", metavar="CIDR",
                         help="the nodes' addresses, which alone may reach the issuer; repeatable "
                              "(default the RFC 1918 ranges, less the pod network)")
    install.add_argument("--pod-cidr", metavar="CIDR",
                         help="the cluster's pod network, kept out of --node-cidr, with a /24 per node "
                              "whose .0 and .1 (flannel.1, cni0) are admitted (default 10.42.0.0/16, k3s's)")
    install.add_argument("--multicluster", action="store_true",
                         help="also a gateway, so linked clusters reach Services exported here "
                              "(docs/multicluster.md); agents then trust its forwarded identities")
    install.add_argument("--linked-trust-domain", action="append", metavar="TD",
                         help="with --multicluster: a trust domain the gateway admits; repeatable")
    install.set_defaults(run=_run_install)


def _add_multicluster_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pinion multicluster`: as `linkerd multicluster` (docs/multicluster.md)."""
    from agent.viz.multicluster_commands import add_multicluster_commands

    add_multicluster_commands(sub)


def _add_viz_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """stat, edges, top, check: read agents' admin endpoints (agent/viz)."""
    from agent.viz.commands import add_viz_commands

    add_viz_commands(sub)


def _add_cni_location_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-root", type=Path, default=Path("/"), metavar="DIR",
                        help="where the host's / is mounted (default /)")
    parser.add_argument("--conf-dir", type=Path, metavar="DIR",
                        help="CNI conf dir, as a path the installer opens (default: detected "
                             "under --host-root, k3s or /etc/cni/net.d)")
    parser.add_argument("--bin-dir", type=Path, metavar="DIR",
                        help="CNI bin dir, as a path the installer opens (default: detected, "
                             "k3s data/cni or data/current/bin, or /opt/cni/bin)")
    parser.add_argument("--plugin", type=Path, metavar="PATH",
                        help="the pinion-cni executable to install (default: cni/pinion-cni "
                             "next to this package)")


def _run_agent(args: argparse.Namespace) -> int:
    values = {name: os.environ.get(f"PINION_{name.upper()}") for name in _AGENT_FLAGS}
    values.update({k: v for k, v in vars(args).items() if k in _AGENT_FLAGS and v is not None})
    values["kubernetes"] = _kubernetes_mode(args)
    try:
        config = Config.from_mapping(values)
    except ValueError as exc:
        print(f"pinion agent: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    from agent.app import run_agent

    return _event_loop_runner()(run_agent(config, cleanup=args.cleanup))


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop's run when it is installed (a faster event loop), else asyncio's."""
    if os.environ.get("PINION_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop  # optional: a faster event loop

            return uvloop.run
        except ImportError:
            pass
    return asyncio.run


def _run_keeper(args: argparse.Namespace) -> int:
    """Exec'd, as it runs for the node's lifetime: the C keeper (PINION_KEEPER, `pinion-keeper`
    on PATH, or keeper/pinion-keeper of a source tree) if there is one, else the Python one,
    which carries none of the CLI's imports either."""
    import shutil

    import agent

    source_tree = Path(agent.__file__).resolve().parents[1] / "keeper" / "pinion-keeper"
    binary = os.environ.get("PINION_KEEPER") or shutil.which("pinion-keeper") or \
        (str(source_tree) if source_tree.exists() else None)
    flags = ["--socket", str(args.socket)]
    if binary:
        os.execv(binary, [binary, *flags])
    os.execv(sys.executable, [sys.executable, "-m", "agent.inpod.keeper", *flags])


def _kubernetes_mode(args: argparse.Namespace) -> str | None:
    """A kubeconfig path, "in-cluster" when running in a pod, or None (standalone)."""
    if args.standalone:
        return None
    if args.kubeconfig or os.environ.get("PINION_KUBECONFIG"):
        return str(args.kubeconfig or os.environ["PINION_KUBECONFIG"])
    from agent.controlplane.kube.config import KubeConfig

    return "in-cluster" if KubeConfig.in_cluster_available() else None


def _run_rules(args: argparse.Namespace) -> int:
    from agent.dataplane.redirect import make_backend
    from agent.dataplane.redirect.plan import build_plan

    args_map = {"PINION_EXCLUDE_OUTBOUND_PORTS": args.exclude_outbound_ports,
                "PINION_EXCLUDE_INBOUND_PORTS": args.exclude_inbound_ports,
                "PINION_EXCLUDE_OUTBOUND_CIDRS": args.exclude_outbound_cidrs}
    try:
        capture = CaptureSettings.from_cni_args(args_map, args.probe_source)
    except ValueError as exc:
        print(f"pinion rules: {exc}", file=sys.stderr)
        return 2
    from agent.config import DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK

    plan = build_plan(Ports(), DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, capture)
    sys.stdout.write(make_backend(args.backend).render(plan))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from agent.lab.demo import run_demo

    return run_demo(redirect=args.redirect, requests=args.requests)


def _cni_setup(args: argparse.Namespace, action: str) -> tuple[HostLayout, bytes | None]:
    """The detected host layout and the plugin's bytes (None if unreadable)."""
    import agent
    from agent.controlplane.cni_install import detect_layout

    plugin_path = args.plugin or Path(agent.__file__).resolve().parents[1] / "cni" / "pinion-cni"
    try:
        plugin: bytes | None = plugin_path.read_bytes()
    except OSError as exc:
        print(f"pinion cni {action}: cannot read the plugin {plugin_path}: {exc}", file=sys.stderr)
        plugin = None
    return detect_layout(args.host_root, args.conf_dir, args.bin_dir), plugin


def _run_cni_install(args: argparse.Namespace) -> int:
    from agent.controlplane import cni_install

    agent_socket = Path(args.agent_socket)
    if not agent_socket.is_absolute() or args.poll_interval <= 0:
        print("pinion cni install: --agent-socket must be an absolute path and "
              "--poll-interval > 0", file=sys.stderr)
        return 2
    layout, plugin = _cni_setup(args, "install")
    if plugin is None:
        return 1
    settings = cni_install.InstallSettings(
        layout, plugin, {"agentSocket": args.agent_socket, "failPolicy": args.fail_policy},
        socket_directory=args.host_root / agent_socket.parent.relative_to("/"))
    if args.watch:
        return _watch_cni(args, settings)
    outcome = cni_install.reconcile(settings)
    print(f"pinion cni install: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def _watch_cni(args: argparse.Namespace, settings: InstallSettings) -> int:
    """`install --watch`: reconcile on every change until SIGTERM/SIGINT."""
    import signal

    from agent.controlplane import cni_install

    _setup_logging("info")
    stop = cni_install.StopSignal()
    previous = {number: signal.signal(number, lambda *_: stop.set())
                for number in (signal.SIGTERM, signal.SIGINT)}
    source = cni_install.make_change_source(settings.layout.conf_dir, args.poll, args.poll_interval)
    try:
        cni_install.watch(settings, source, stop, uninstall_on_exit=_uninstall_on_exit(args))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        source.close()
        stop.close()
    return 0


def _uninstall_on_exit(args: argparse.Namespace) -> bool | Callable[[], bool]:
    if not args.uninstall_on_exit or not args.unless_daemonset:
        return bool(args.uninstall_on_exit)
    from agent.controlplane.cni_install.rollout import uninstall_unless_rolling

    return lambda: uninstall_unless_rolling(args.unless_daemonset, os.environ.get("PINION_KUBECONFIG"))


def _run_cni_uninstall(args: argparse.Namespace) -> int:
    from agent.controlplane import cni_install

    layout, plugin = _cni_setup(args, "uninstall")
    outcome = cni_install.uninstall(layout, plugin)
    print(f"pinion cni uninstall: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def _run_identity_init(args: argparse.Namespace) -> int:
    from agent.identity.files import init_identity_dir, init_linked_identity_dir

    try:
        if args.anchor_from is not None:
            written = init_linked_identity_dir(args.dir, args.anchor_from, args.trust_domain)
        else:
            written = init_identity_dir(args.dir, args.trust_domain, force=args.force)
    except FileExistsError as exc:
        print(f"pinion identity init: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pinion identity init: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_mode & 0o777:04o})")
    return 0


def _run_issuer(args: argparse.Namespace) -> int:
    from agent.controlplane.issuer.server import IssuerSettings, run_issuer

    try:
        settings = IssuerSettings.parse(
            identity_dir=args.identity_dir, listen=args.listen, admin_addr=args.admin_addr,
            kubeconfig=args.kubeconfig, agent_service_account=args.agent_service_account,
            audience=args.audience, bundle_configmap=args.bundle_configmap, max_lifetime=args.max_lifetime)
    except ValueError as exc:
        print(f"pinion issuer: {exc}", file=sys.stderr)
        return 2
    _setup_logging("info")
    return asyncio.run(run_issuer(settings))


def _run_install(args: argparse.Namespace) -> int:
    """Manifests on stdout; what happened to the trust anchor on stderr."""
    from agent.deploy import install

    try:
        if args.identity_dir is not None:
            credentials = install.IssuerCredentials.from_identity_dir(args.identity_dir)
            if args.trust_domain not in (None, credentials.trust_domain):
                raise install.InstallError(f"--trust-domain {args.trust_domain} differs from "
                                           f"{args.identity_dir}'s {credentials.trust_domain}")
        else:
            credentials = install.IssuerCredentials.generate(args.trust_domain or "cluster.local")
        overrides = install.Overrides(args.image, args.redirect, args.log_level,
                                      tuple(args.node_cidr or install.DEFAULT_NODE_CIDRS),
                                      args.pod_cidr or install.DEFAULT_POD_CIDR)
        documents = install.render(install.load_manifests(), credentials, overrides)
        if args.multicluster:
            documents = install.with_multicluster(documents, credentials.trust_domain,
                                                  args.linked_trust_domain or [],
                                                  args.image)
    except install.InstallError as exc:
        print(f"pinion install: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(install.to_yaml(documents, credentials.trust_domain))
    if args.identity_dir is not None:
        print(f"pinion install: issuer and trust bundle from {args.identity_dir}; its trust "
              "anchor key stays there and is not in the output", file=sys.stderr)
    else:
        print(f"pinion install: generated a trust anchor for {credentials.trust_domain} and an issuer "
              "valid for one year; the anchor's private key was not kept (it never enters the "
              "cluster), so no new issuer can be signed by it. To keep an anchor, run `pinion "
              "identity init --dir DIR` and `pinion install --identity-dir DIR`.", file=sys.stderr)
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

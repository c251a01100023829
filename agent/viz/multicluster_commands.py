"""`pinion multicluster link|gateway|mirror|check|gateways` (docs/multicluster.md): flags,
and the glue to the programs and manifests they run or print. Heavy parts are imported only
by the action that needs them."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path


def add_multicluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pinion multicluster` and its actions."""
    parser = sub.add_parser("multicluster", help="link clusters: gateway, link, mirror, check, gateways")
    actions = parser.add_subparsers(metavar="ACTION")

    def kube(command: argparse.ArgumentParser) -> None:
        command.add_argument("--kubeconfig", metavar="PATH", help="this cluster (default: $KUBECONFIG, "
                             "~/.kube/config, or in-cluster with --in-cluster)")
        command.add_argument("--in-cluster", action="store_true", help="the pod's service account")

    link = actions.add_parser("link", help="print what to apply in the *other* cluster so it mirrors "
                                           "this one's exported Services")
    kube(link)
    link.add_argument("--cluster-name", required=True, metavar="NAME",
                      help="this cluster's name there (mirrors are called <svc>-NAME)")
    link.add_argument("--api-server-address", metavar="URL",
                      help="this cluster's API server as the other cluster reaches it "
                           "(default: the kubeconfig's)")
    link.add_argument("--gateway-address", metavar="IP[:PORT]",
                      help="the gateway as the other cluster reaches it (default: its Service's "
                           "load-balancer address, port 4143)")
    link.add_argument("--gateway-identity", metavar="SPIFFE", help="default: the ConfigMap pinion-gateway's")
    link.add_argument("--image", metavar="IMAGE", help="the mirror's image")
    link.set_defaults(run=_run_mc_link)

    gateway = actions.add_parser("gateway", help="run the gateway (mTLS from linked clusters' agents)")
    kube(gateway)
    gateway.add_argument("--identity-dir", type=Path, metavar="DIR",
                         help="sign its own certificate with this issuer (labs); default: from "
                              "the issuer service, with its service-account token")
    gateway.add_argument("--issuer-url", metavar="URL", help="default "
                         "https://pinion-issuer.pinion-system.svc:8443")
    gateway.add_argument("--token-file", type=Path, metavar="PATH",
                         help="projected token, audience pinion-issuer "
                              "(default /var/run/secrets/pinion/token)")
    gateway.add_argument("--trust-bundle", type=Path, metavar="PATH",
                         help="default /var/run/pinion/trust-bundle/trust-bundle.crt")
    gateway.add_argument("--trust-domain", default="cluster.local", metavar="TD")
    gateway.add_argument("--listen", default=f"0.0.0.0:{4143}", metavar="IP:PORT")
    gateway.add_argument("--admin-addr", default="0.0.0.0:4191", metavar="IP:PORT",
                         help="/metrics, /ready (the linked clusters' probe), /live")
    gateway.add_argument("--linked-trust-domain", action="append", required=True, metavar="TD",
                         help="a trust domain whose workloads may come in; repeatable")
    gateway.add_argument("--max-streams", type=int, default=4096, metavar="N",
                         help="streams forwarded at once, all callers together (default 4096)")
    gateway.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    gateway.set_defaults(run=_run_mc_gateway)

    mirror = actions.add_parser("mirror", help="run one link's service mirror")
    kube(mirror)
    mirror.add_argument("--link-dir", type=Path, required=True, metavar="DIR",
                        help="the link's Secret and ConfigMap, mounted (kubeconfig, cluster-name, ...)")
    mirror.add_argument("--resync-seconds", type=float, default=30.0, metavar="S")
    mirror.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    mirror.set_defaults(run=_run_mc_mirror)

    for name, text in (("check", "check every link: settings, remote API, gateway, mirrors"),
                       ("gateways", "every linked cluster's gateway: alive, mirrored Services, latency")):
        command = actions.add_parser(name, help=text)
        kube(command)
        command.add_argument("--timeout", type=float, default=5.0, metavar="S")
        command.set_defaults(run=_run_mc_status, action=name)


def _mc_kubeconfig(args: argparse.Namespace) -> str | None:
    """None = in-cluster; else the kubeconfig path (flag, $KUBECONFIG, ~/.kube/config)."""
    if args.in_cluster:
        return None
    return args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")


def _run_mc_link(args: argparse.Namespace) -> int:
    from agent.controlplane.kube.client import ApiError, KubeClient
    from agent.controlplane.kube.config import KubeConfig, KubeConfigError
    from agent.deploy import multicluster as manifests
    from agent.deploy.install import to_yaml

    async def read() -> manifests.RemoteCluster:
        config = KubeConfig.load(_mc_kubeconfig(args))
        client = KubeClient(config)
        try:
            return await manifests.read_remote(client, args.api_server_address or config.server,
                                               config.ca_pem, args.gateway_address, args.gateway_identity)
        finally:
            await client.close()

    try:
        remote = asyncio.run(read())
        documents = manifests.link_manifests(args.cluster_name, remote,
                                             args.image or manifests.DEFAULT_IMAGE)
    except (ValueError, OSError, TimeoutError, ApiError, KubeConfigError) as exc:
        print(f"pinion multicluster link: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(documents, f"the link to {args.cluster_name}").replace(
        "from `pinion install`", "from `pinion multicluster link`"))
    return 0


def _run_mc_gateway(args: argparse.Namespace) -> int:
    import dataclasses

    from agent.config import parse_host_port
    from agent.controlplane.multicluster.gateway import GatewayConfig, run_gateway

    try:
        config = GatewayConfig(parse_host_port(args.listen), parse_host_port(args.admin_addr),
                               _mc_kubeconfig(args), args.identity_dir,
                               frozenset(args.linked_trust_domain), trust_domain=args.trust_domain,
                               max_streams=args.max_streams)
        config = dataclasses.replace(config, **{name: value for name, value in (
            ("issuer_url", args.issuer_url), ("token_file", args.token_file),
            ("trust_bundle", args.trust_bundle)) if value is not None})
    except ValueError as exc:
        print(f"pinion multicluster gateway: {exc}", file=sys.stderr)
        return 2
    from agent.cli import _event_loop_runner, _setup_logging

    _setup_logging(args.log_level)
    return _event_loop_runner()(run_gateway(config))


def _run_mc_mirror(args: argparse.Namespace) -> int:
    from agent.cli import _setup_logging
    from agent.controlplane.multicluster.mirror import run_mirror
    from agent.core.multicluster import LinkError

    _setup_logging(args.log_level)
    try:
        return asyncio.run(run_mirror(_mc_kubeconfig(args), args.link_dir, args.resync_seconds))
    except LinkError as exc:
        print(f"pinion multicluster mirror: {exc}", file=sys.stderr)
        return 2


def _run_mc_status(args: argparse.Namespace) -> int:
    from agent.controlplane.kube.client import ApiError
    from agent.controlplane.kube.config import KubeConfigError
    from agent.viz.multicluster import run

    try:
        text, code = asyncio.run(run(_mc_kubeconfig(args), args.action, args.timeout))
    except (OSError, TimeoutError, ApiError, KubeConfigError) as exc:
        print(f"pinion multicluster {args.action}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return code

"""deploy/ and `pinion install`: valid Kubernetes 1.30 objects (kubernetes-validate, strict
schemas), and the things a schema cannot see: mounts have volumes, accounts exist, RBAC and
capabilities are exactly the contract's, the agent's flags parse, the Secret carries the
issuer and never the anchor, and the issuer chains to the bundle (`openssl verify`)."""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent import cli
from agent.config import Config
from agent.controlplane.cni_install import layout
from agent.deploy import install
from agent.identity import files

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "pinion-system"
IMAGE = "ghcr.io/pinion-mesh/pinion:0.1.0"
NODE_IP = "192.168.1.21"  # what the downward API gives for status.hostIP in these tests
IN_CI = os.environ.get("CI") == "true"


def objects_in(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def checked_in() -> list[dict[str, Any]]:
    return [document for path in sorted(DEPLOY.glob("*.yaml")) for document in objects_in(path)]


def run_install(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["install", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def installed() -> list[dict[str, Any]]:
    code, out, _ = run_install()
    assert code == 0
    return [document for document in yaml.safe_load_all(out) if document is not None]


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in documents:
        if document["kind"] in ("DaemonSet", "Deployment"):
            yield document["metadata"]["name"], document["spec"]["template"]["spec"]


def container(documents: list[dict[str, Any]], workload: str, name: str) -> dict[str, Any]:
    spec = dict(pod_specs(documents))[workload]
    return next(c for c in spec["containers"] if c["name"] == name)


def secret_values(documents: list[dict[str, Any]]) -> dict[str, bytes]:
    secret = find(documents, "Secret", "pinion-issuer")
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def require_tool(name: str) -> str:
    """The tool's path; outside CI a missing tool skips, in CI it fails."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing tool fails)")
        pytest.skip(message)
    return path


# --- the files and the schemas --------------------------------------------------------------

def test_install_renders_every_manifest_file_and_nothing_else() -> None:
    assert sorted(install.MANIFEST_FILES) == sorted(p.name for p in DEPLOY.glob("*.yaml"))
    assert Path(str(install.manifest_directory())).resolve() == DEPLOY.resolve()


def test_kubernetes_validate_has_the_1_30_schemas() -> None:
    namespace = objects_in(DEPLOY / "00-namespace.yaml")[0]
    assert kubernetes_validate.validate(namespace, KUBERNETES_VERSION, strict=True) == "1.30"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_checked_in_manifests_validate_against_kubernetes_1_30(path: Path) -> None:
    for document in objects_in(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_install_output_validates_against_kubernetes_1_30(installed: list[dict[str, Any]]) -> None:
    for document in installed:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(find(checked_in(), "DaemonSet", "pinion-agent"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


# --- what a schema cannot see ---------------------------------------------------------------

@pytest.fixture(params=["checked-in", "installed"])
def objects(request: pytest.FixtureRequest, installed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return checked_in() if request.param == "checked-in" else installed


def test_everything_namespaced_is_in_pinion_system(objects: list[dict[str, Any]]) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for document in objects:
        namespace = document["metadata"].get("namespace")
        assert namespace == (None if document["kind"] in cluster_scoped else NAMESPACE), document["kind"]
    assert find(objects, "Namespace", NAMESPACE)


def test_every_volume_mount_has_a_volume_and_every_volume_is_mounted(objects: list[dict[str, Any]]) -> None:
    for workload, spec in pod_specs(objects):
        volumes = {volume["name"] for volume in spec.get("volumes", [])}
        mounted = {mount["name"] for c in spec["containers"] + spec.get("initContainers", [])
                   for mount in c.get("volumeMounts", [])}
        assert mounted <= volumes, f"{workload}: mounts without a volume: {mounted - volumes}"
        assert volumes <= mounted, f"{workload}: volumes nobody mounts: {volumes - mounted}"


def test_each_workload_runs_as_a_service_account_of_rbac_yaml(objects: list[dict[str, Any]]) -> None:
    rbac = objects_in(DEPLOY / "rbac.yaml")
    accounts = {(d["metadata"]["name"], d["metadata"]["namespace"])
                for d in rbac if d["kind"] == "ServiceAccount"}
    assert dict((w, s["serviceAccountName"]) for w, s in pod_specs(objects)) == {
        "pinion-agent": "pinion-agent", "pinion-issuer": "pinion-issuer",
        "pinion-keeper": "pinion-keeper"}
    assert {("pinion-agent", NAMESPACE), ("pinion-issuer", NAMESPACE),
            ("pinion-keeper", NAMESPACE)} <= accounts


def rules_of(document: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...], str]]:
    """(apiGroup, resource, resourceNames, verb) for every combination a rule grants."""
    return {(group, resource, tuple(rule.get("resourceNames", ())), verb)
            for rule in document["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_grants_exactly_what_docs_kubernetes_md_says() -> None:
    rbac = objects_in(DEPLOY / "rbac.yaml")
    agent = {("", r, (), v) for r in ("pods", "namespaces", "services") for v in ("get", "list", "watch")}
    agent |= {("discovery.k8s.io", "endpointslices", (), v) for v in ("list", "watch")}
    agent |= {("batch", "jobs", (), v) for v in ("list", "watch")}
    assert rules_of(find(rbac, "ClusterRole", "pinion-agent")) == agent
    assert rules_of(find(rbac, "ClusterRole", "pinion-issuer")) == {
        ("authentication.k8s.io", "tokenreviews", (), "create"),
        ("", "pods", (), "get"), ("", "pods", (), "list")}
    assert rules_of(find(rbac, "Role", "pinion-issuer-trust-bundle")) == {
        ("", "configmaps", ("pinion-trust-bundle",), "get"),
        ("", "configmaps", ("pinion-trust-bundle",), "update")}
    assert rules_of(find(rbac, "Role", "pinion-agent-rollout")) == {
        ("apps", "daemonsets", ("pinion-agent",), "get")}
    assert {d["kind"] for d in rbac} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                         "Role", "RoleBinding"}


def test_each_binding_gives_its_role_to_its_own_account_only() -> None:
    rbac = objects_in(DEPLOY / "rbac.yaml")
    bindings = {(d["kind"], d["roleRef"]["kind"], d["roleRef"]["name"]):
                [(s["kind"], s["name"], s["namespace"]) for s in d["subjects"]]
                for d in rbac if d["kind"].endswith("Binding")}
    agent = [("ServiceAccount", "pinion-agent", NAMESPACE)]
    issuer = [("ServiceAccount", "pinion-issuer", NAMESPACE)]
    assert bindings == {("ClusterRoleBinding", "ClusterRole", "pinion-agent"): agent,
                        ("ClusterRoleBinding", "ClusterRole", "pinion-issuer"): issuer,
                        ("RoleBinding", "Role", "pinion-issuer-trust-bundle"): issuer,
                        ("RoleBinding", "Role", "pinion-agent-rollout"): agent}


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def test_nothing_is_privileged_and_capabilities_are_exactly_the_listed_ones(
        objects: list[dict[str, Any]]) -> None:
    assert ("privileged", True) not in list(walk(objects))
    wanted = {("pinion-agent", "agent"): {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF"},
              ("pinion-agent", "cni-installer"): set(), ("pinion-issuer", "issuer"): set(),
              ("pinion-keeper", "keeper"): set()}
    found = {}
    for workload, spec in pod_specs(objects):
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"], c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            found[workload, c["name"]] = set(context["capabilities"].get("add", []))
    assert found == wanted


def test_the_issuer_runs_as_non_root_with_the_runtime_seccomp_profile(objects: list[dict[str, Any]]) -> None:
    specs = dict(pod_specs(objects))
    assert specs["pinion-issuer"]["securityContext"]["runAsNonRoot"] is True
    assert specs["pinion-issuer"]["securityContext"]["runAsUser"] != 0
    for spec in specs.values():
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    mount = container(objects, "pinion-issuer", "issuer")["volumeMounts"][0]
    assert (mount["mountPath"], mount["readOnly"]) == ("/var/run/pinion/issuer", True)
    assert specs["pinion-issuer"]["volumes"][0]["secret"]["secretName"] == "pinion-issuer"


def mounts_by_path(workload_container: dict[str, Any], spec: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in workload_container["volumeMounts"]}


def test_the_agent_pod_is_on_the_host_network_on_every_node(objects: list[dict[str, Any]]) -> None:
    daemonset = find(objects, "DaemonSet", "pinion-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert (spec["hostNetwork"], spec["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                   "rollingUpdate": {"maxUnavailable": 1}}
    assert container(objects, "pinion-agent", "agent")["securityContext"]["runAsUser"] == 0


def test_the_agent_mounts_what_capture_needs(objects: list[dict[str, Any]]) -> None:
    spec = dict(pod_specs(objects))["pinion-agent"]
    mounts = mounts_by_path(container(objects, "pinion-agent", "agent"), spec)
    host_paths = {path: (volume["hostPath"]["path"], mount.get("mountPropagation"),
                         mount.get("readOnly", False))
                  for path, (mount, volume) in mounts.items() if "hostPath" in volume}
    assert host_paths == {
        "/run/pinion": ("/run/pinion", None, False),
        "/var/lib/pinion": ("/var/lib/pinion", None, False),
        "/run/netns": ("/run/netns", "HostToContainer", False),
        # Bidirectional needs privileged; HostToContainer a shared host mount (systemd's only)
        "/sys/fs/bpf": ("/sys/fs/bpf", None, False),
        "/sys/fs/cgroup": ("/sys/fs/cgroup", None, True),
    }
    token = mounts["/var/run/secrets/pinion"][1]["projected"]["sources"]
    assert token == [{"serviceAccountToken": {"audience": "pinion-issuer", "expirationSeconds": 3600,
                                              "path": "token"}}]
    assert mounts["/var/run/pinion/trust-bundle"][1]["configMap"]["name"] == "pinion-trust-bundle"


def expand(arguments: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], a) for a in arguments]


def container_env(objects: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    settings = find(objects, "ConfigMap", "pinion-config")["data"]
    env = {}
    for variable in c.get("env", []):
        source = variable.get("valueFrom", {})
        if "configMapKeyRef" in source:
            assert source["configMapKeyRef"]["name"] == "pinion-config"
            env[variable["name"]] = settings[source["configMapKeyRef"]["key"]]
        elif "fieldRef" in source:
            downward = {"spec.nodeName": "node-a", "metadata.uid": "0d5c7a1e-uid",
                        "status.hostIP": NODE_IP}
            env[variable["name"]] = downward[source["fieldRef"]["fieldPath"]]
    return env


def test_the_agent_command_is_one_pinion_agent_accepts(objects: list[dict[str, Any]]) -> None:
    agent = container(objects, "pinion-agent", "agent")
    env = container_env(objects, agent)
    assert env["PINION_NODE_NAME"] == "node-a"
    argv = agent["command"][1:] + expand(agent["args"], env)
    args = cli._parser().parse_args(argv)
    assert args.run is cli._run_agent
    values = {name: env.get(f"PINION_{name.upper()}") for name in cli._AGENT_FLAGS}
    values.update({k: v for k, v in vars(args).items() if k in cli._AGENT_FLAGS and v is not None})
    config = Config.from_mapping(values)
    assert (config.node_name, config.admin_host, config.admin_port) == ("node-a", NODE_IP, 4191)
    assert (str(config.cni_socket), str(config.state_dir), config.redirect) == (
        "/run/pinion/cni.sock", "/var/lib/pinion", "auto")
    assert config.trust_domain == find(objects, "ConfigMap", "pinion-config")["data"]["trust-domain"]
    # The Kubernetes-mode defaults the agent reads are where the pod mounts them.
    spec = dict(pod_specs(objects))["pinion-agent"]
    mounts = mounts_by_path(agent, spec)
    token, bundle = mounts["/var/run/secrets/pinion"], mounts["/var/run/pinion/trust-bundle"]
    assert config.token_file.parent == Path(token[0]["mountPath"])
    assert config.token_file.name == token[1]["projected"]["sources"][0]["serviceAccountToken"]["path"]
    assert config.trust_bundle == Path(bundle[0]["mountPath"]) / files.TRUST_BUNDLE


def test_the_issuer_command_is_one_pinion_issuer_accepts(objects: list[dict[str, Any]]) -> None:
    from agent.controlplane.issuer.server import IssuerSettings

    issuer = container(objects, "pinion-issuer", "issuer")
    args = cli._parser().parse_args(issuer["command"][1:] + issuer["args"])
    assert args.run is cli._run_issuer
    settings = IssuerSettings.parse(
        identity_dir=args.identity_dir, listen=args.listen, admin_addr=args.admin_addr,
        kubeconfig=args.kubeconfig, agent_service_account=args.agent_service_account,
        audience=args.audience, bundle_configmap=args.bundle_configmap, max_lifetime=args.max_lifetime)
    ports = {p["name"]: p["containerPort"] for p in issuer["ports"]}
    assert (settings.listen[1], settings.admin[1]) == (ports["https"], ports["admin"])
    assert str(settings.identity_dir) == issuer["volumeMounts"][0]["mountPath"]
    assert (settings.bundle_namespace, settings.bundle_name) == (NAMESPACE, "pinion-trust-bundle")
    assert (settings.agent_namespace, settings.agent_service_account) == (NAMESPACE, "pinion-agent")
    agent_token = dict(pod_specs(objects))["pinion-agent"]["volumes"]
    audiences = [s["serviceAccountToken"]["audience"] for v in agent_token if "projected" in v
                 for s in v["projected"]["sources"]]
    assert audiences == [settings.audience]


def test_the_cni_installer_sees_every_directory_the_layout_may_choose(objects: list[dict[str, Any]]) -> None:
    installer = container(objects, "pinion-agent", "cni-installer")
    args = cli._parser().parse_args(installer["command"][1:] + installer["args"])
    assert (args.run, args.watch, args.uninstall_on_exit) == (cli._run_cni_install, True, True)
    spec = dict(pod_specs(objects))["pinion-agent"]
    mounts = mounts_by_path(installer, spec)
    for mount_path, (_, volume) in mounts.items():  # each host path appears where it is on the host
        assert mount_path == str(args.host_root / volume["hostPath"]["path"].lstrip("/"))
    needed = [layout.K3S_CONF_DIR, layout.K3S_BIN_DIR, layout.K3S_OLD_BIN_DIR, layout.STANDARD_CONF_DIR,
              layout.STANDARD_BIN_DIR, Path(args.agent_socket).parent.relative_to("/")]
    for relative in needed:
        target = args.host_root / relative
        assert any(target.is_relative_to(m) for m in mounts), f"{target} is not mounted"
    # Nothing above the CNI dirs: not k3s' server/ (CA keys, join token) nor agent/ (credentials).
    k3s = Path("/var/lib/rancher/k3s")
    assert {volume["hostPath"]["path"] for _, volume in mounts.values()
            if Path(volume["hostPath"]["path"]).is_relative_to(k3s)} == {
        str(k3s / "agent/etc/cni/net.d"), str(k3s / "data")}
    writable = {path for path, (mount, _) in mounts.items() if not mount.get("readOnly", False)}
    assert writable == {str(args.host_root / d) for d in (layout.K3S_CONF_DIR, layout.K3S_DATA_DIR,
                                                           layout.STANDARD_CONF_DIR, layout.STANDARD_BIN_DIR)}


def created_host_paths(root: Path, objects: list[dict[str, Any]]) -> None:
    """What kubelet does for the installer's hostPath volumes on a node that lacks them."""
    spec = dict(pod_specs(objects))["pinion-agent"]
    for _, volume in mounts_by_path(container(objects, "pinion-agent", "cni-installer"), spec).values():
        (root / volume["hostPath"]["path"].lstrip("/")).mkdir(parents=True, exist_ok=True)


def test_the_installers_mounts_do_not_make_a_kubeadm_node_look_like_k3s(
        objects: list[dict[str, Any]], tmp_path: Path) -> None:
    created_host_paths(tmp_path, objects)
    detected = layout.detect_layout(tmp_path)
    assert (detected.flavour, detected.conf_dir) == ("standard", tmp_path / layout.STANDARD_CONF_DIR)


@pytest.mark.parametrize("bin_dir", [layout.K3S_BIN_DIR, layout.K3S_OLD_BIN_DIR])
def test_through_the_installers_mounts_k3s_is_k3s(objects: list[dict[str, Any]], tmp_path: Path,
                                                  bin_dir: str) -> None:
    data = tmp_path / layout.K3S_DATA_DIR
    if bin_dir == layout.K3S_OLD_BIN_DIR:  # data/current -> /var/lib/rancher/k3s/data/<hash>
        (data / "4a1c9e" / "bin").mkdir(parents=True)
        (data / "current").symlink_to("/" + layout.K3S_DATA_DIR + "/4a1c9e")
    else:
        (data / "cni").mkdir(parents=True)
    created_host_paths(tmp_path, objects)
    detected = layout.detect_layout(tmp_path)
    assert (detected.flavour, detected.conf_dir) == ("k3s", tmp_path / layout.K3S_CONF_DIR)
    assert detected.plugin_path().parent.is_dir()
    assert detected.plugin_path().is_relative_to(data)


def test_probes_and_ports(objects: list[dict[str, Any]]) -> None:
    for workload, name, port in (("pinion-agent", "agent", 4191), ("pinion-issuer", "issuer", 9990)):
        c = container(objects, workload, name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["admin"] == port
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    agent = container(objects, "pinion-agent", "agent")
    assert agent["resources"]["requests"] == {"cpu": "50m", "memory": "48Mi"}
    assert agent["resources"]["limits"] == {"memory": "256Mi"}


def test_the_admin_endpoint_listens_on_the_node_ip_where_probes_and_prometheus_reach_it(
        objects: list[dict[str, Any]]) -> None:
    agent = container(objects, "pinion-agent", "agent")
    downward = {v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"] for v in agent["env"]
                if "fieldRef" in v.get("valueFrom", {})}
    assert downward["HOST_IP"] == "status.hostIP"
    assert "--admin-addr=$(HOST_IP):4191" in agent["args"]
    assert not any("0.0.0.0" in argument for argument in agent["args"])
    # hostNetwork: the pod IP is the node IP. Probes name no host, so kubelet asks the pod IP;
    # the headless Service's endpoints are pod IPs too, so Prometheus scrapes the same address.
    assert dict(pod_specs(objects))["pinion-agent"]["hostNetwork"] is True
    for probe in ("readinessProbe", "livenessProbe"):
        assert "host" not in agent[probe]["httpGet"]
    metrics = find(objects, "Service", "pinion-agent-metrics")
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["ports"][0]["targetPort"] == "admin"


def test_services_select_their_pods(objects: list[dict[str, Any]]) -> None:
    metrics = find(objects, "Service", "pinion-agent-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert metrics["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == "4191"
    assert metrics["spec"]["ports"] == [{"name": "admin", "port": 4191, "targetPort": "admin",
                                         "protocol": "TCP"}]
    issuer = find(objects, "Service", "pinion-issuer")
    assert [p["port"] for p in issuer["spec"]["ports"]] == [8443]
    for service, workload in ((metrics, "DaemonSet/pinion-agent"), (issuer, "Deployment/pinion-issuer")):
        labels = find(objects, *workload.split("/"))["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_every_container_uses_the_image_if_present(objects: list[dict[str, Any]]) -> None:
    for _, spec in pod_specs(objects):
        for c in spec["containers"]:
            assert (c["image"], c["imagePullPolicy"]) == (IMAGE, "IfNotPresent")


def test_the_checked_in_trust_bundle_is_a_placeholder_that_no_agent_would_accept(tmp_path: Path) -> None:
    bundle = find(checked_in(), "ConfigMap", "pinion-trust-bundle")["data"]["trust-bundle.crt"]
    assert "pinion install" in bundle
    (tmp_path / "trust-bundle.crt").write_text(bundle)
    with pytest.raises(ValueError, match="no PEM certificate"):
        files.load_trust_bundle(tmp_path)
    assert "Secret" not in {d["kind"] for d in checked_in()}  # only `pinion install` writes it


# --- the issuer's credentials in `pinion install` -------------------------------------------

def test_the_secret_holds_the_issuer_and_never_the_anchor_key(installed: list[dict[str, Any]]) -> None:
    values = secret_values(installed)
    assert sorted(values) == sorted(["issuer.crt", "issuer.key", "trust-bundle.crt", "trust-domain"])
    assert find(installed, "Secret", "pinion-issuer")["type"] == "Opaque"
    assert values["trust-domain"] == b"cluster.local\n"
    everything = yaml.safe_dump_all(installed) + "".join(v.decode() for v in values.values())
    assert everything.count("PRIVATE KEY-----\n") == 2  # BEGIN and END of issuer.key, nothing else
    bundle = find(installed, "ConfigMap", "pinion-trust-bundle")["data"]["trust-bundle.crt"]
    assert bundle.encode() == values["trust-bundle.crt"]
    assert find(installed, "ConfigMap", "pinion-config")["data"]["trust-domain"] == "cluster.local"


def test_the_issuer_verifies_against_the_bundle_with_openssl(installed: list[dict[str, Any]],
                                                            tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    values = secret_values(installed)
    assert len(files.split_pem_certificates(values["trust-bundle.crt"])) == 1
    for name in ("trust-bundle.crt", "issuer.crt", "issuer.key"):
        (tmp_path / name).write_bytes(values[name])
    subprocess.run([openssl, "x509", "-noout", "-in", tmp_path / "trust-bundle.crt"], check=True)
    verified = subprocess.run([openssl, "verify", "-CAfile", tmp_path / "trust-bundle.crt",
                               tmp_path / "issuer.crt"], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified.stderr
    key = subprocess.run([openssl, "pkey", "-in", tmp_path / "issuer.key", "-pubout"],
                         capture_output=True, check=True).stdout
    cert = subprocess.run([openssl, "x509", "-in", tmp_path / "issuer.crt", "-noout", "-pubkey"],
                          capture_output=True, check=True).stdout
    assert key == cert


def test_each_install_makes_a_new_anchor_and_says_its_key_was_not_kept() -> None:
    first, second = run_install(), run_install("--trust-domain", "pi.example")
    assert first[0] == second[0] == 0
    assert "private key was not kept" in first[2] and "pinion identity init" in first[2]
    docs = [list(yaml.safe_load_all(out)) for _, out, _ in (first, second)]
    bundles = [secret_values([d for d in stream if d])["trust-bundle.crt"] for stream in docs]
    assert bundles[0] != bundles[1]
    assert secret_values([d for d in docs[1] if d])["trust-domain"] == b"pi.example\n"


def test_identity_dir_supplies_the_issuer_and_keeps_its_anchor_key(tmp_path: Path) -> None:
    files.init_identity_dir(tmp_path / "id", "home.arpa")
    code, out, err = run_install("--identity-dir", str(tmp_path / "id"))
    assert code == 0 and "stays there" in err
    documents = [d for d in yaml.safe_load_all(out) if d]
    values = secret_values(documents)
    for name in ("issuer.crt", "issuer.key", "trust-bundle.crt"):
        assert values[name] == (tmp_path / "id" / name).read_bytes()
    assert values["trust-domain"] == b"home.arpa\n"
    anchor_key = (tmp_path / "id" / "trust-anchor.key").read_text().strip().splitlines()[1]
    assert anchor_key not in out and base64.b64encode(anchor_key.encode()).decode()[:40] not in out


def test_identity_dir_refusals(tmp_path: Path) -> None:
    files.init_identity_dir(tmp_path / "id", "home.arpa")
    code, out, err = run_install("--identity-dir", str(tmp_path / "id"), "--trust-domain", "other.example")
    assert (code, out) == (1, "") and "differs" in err
    code, out, err = run_install("--identity-dir", str(tmp_path / "missing"))
    assert (code, out) == (1, "") and "not a usable identity directory" in err
    files.init_identity_dir(tmp_path / "other", "home.arpa")
    (tmp_path / "id" / "trust-bundle.crt").write_bytes((tmp_path / "other" / "trust-bundle.crt").read_bytes())
    code, out, err = run_install("--identity-dir", str(tmp_path / "id"))
    assert (code, out) == (1, "") and "is not signed by any anchor" in err


def test_overrides_change_only_what_they_name() -> None:
    code, out, _ = run_install("--image", "registry.local/pinion:dev", "--redirect", "nftables",
                               "--log-level", "debug")
    assert code == 0
    documents = [d for d in yaml.safe_load_all(out) if d]
    assert find(documents, "ConfigMap", "pinion-config")["data"] == {
        "trust-domain": "cluster.local", "redirect": "nftables", "log-level": "debug",
        "gateway-identities": ""}
    images = {c["image"] for _, spec in pod_specs(documents) for c in spec["containers"]}
    assert images == {"registry.local/pinion:dev"}
    agent = container(documents, "pinion-agent", "agent")
    assert "--redirect=nftables" in expand(agent["args"], container_env(documents, agent))


def test_the_stream_puts_dependencies_first(installed: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in installed]
    assert kinds[0] == "Namespace"
    assert kinds.index("Secret") < kinds.index("Deployment") < kinds.index("DaemonSet")
    assert max(i for i, k in enumerate(kinds) if k == "ServiceAccount") < kinds.index("Deployment")


def test_the_agent_never_imports_yaml() -> None:
    code = "import sys, agent.app, agent.cli; sys.exit('yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- kubectl against the in-test API server -------------------------------------------------

@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[Any]:
    from tests.support.kubeapi import FakeApiServer

    server = FakeApiServer(host="127.0.0.1", port=0, directory=tmp_path / "api").start()
    try:
        yield server
    finally:
        server.stop()


def kubectl_dry_run(server: Any, tmp_path: Path, target: str, stdin: str | None = None) -> list[str]:
    """`kubectl apply --dry-run=client` (which still asks the server what exists, by discovery)."""
    kubectl = require_tool("kubectl")
    result = subprocess.run([kubectl, "--kubeconfig", str(server.kubeconfig),
                             "--cache-dir", str(tmp_path / "cache"),
                             "apply", "--dry-run=client", "--validate=false", "-f", target],
                            input=stdin, capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def created(documents: list[dict[str, Any]]) -> list[str]:
    """What kubectl says for each object it would create: `<kind>[.<group>]/<name> created (dry run)`."""
    lines = []
    for document in documents:
        group = document["apiVersion"].rpartition("/")[0]
        resource = document["kind"].lower() + (f".{group}" if group else "")
        lines.append(f"{resource}/{document['metadata']['name']} created (dry run)")
    return sorted(lines)


def test_kubectl_would_create_every_object_of_deploy(api_server: Any, tmp_path: Path) -> None:
    output = kubectl_dry_run(api_server, tmp_path, str(DEPLOY))
    assert sorted(output) == created(checked_in())
    assert "daemonset.apps/pinion-agent created (dry run)" in output


def test_kubectl_would_create_every_object_of_pinion_install(api_server: Any, tmp_path: Path) -> None:
    code, stream, _ = run_install()
    assert code == 0
    output = kubectl_dry_run(api_server, tmp_path, "-", stdin=stream)
    documents = [d for d in yaml.safe_load_all(stream) if d]
    assert sorted(output) == created(documents)
    assert "secret/pinion-issuer created (dry run)" in output


# --- who may reach the issuer (#12) ---------------------------------------------------------

def test_the_issuer_network_policy_admits_8443_only_from_node_addresses(
        objects: list[dict[str, Any]]) -> None:
    policy = find(objects, "NetworkPolicy", "pinion-issuer")
    issuer_labels = find(objects, "Deployment", "pinion-issuer")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= issuer_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    tls, admin = policy["spec"]["ingress"]
    ports = {p["name"]: p["containerPort"] for p in container(objects, "pinion-issuer", "issuer")["ports"]}
    assert tls["ports"] == [{"port": ports["https"], "protocol": "TCP"}]
    assert admin == {"ports": [{"port": ports["admin"], "protocol": "TCP"}]}  # probes and scrapes: open
    assert all(set(peer) == {"ipBlock"} for peer in tls["from"])  # no pod or namespace selector
    assert {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.42.0.0/16"]}} in tls["from"]


def test_install_admits_each_nodes_flannel_and_cni0_address_and_no_pod(
        installed: list[dict[str, Any]]) -> None:
    peers = find(installed, "NetworkPolicy", "pinion-issuer")["spec"]["ingress"][0]["from"]
    blocks = [peer["ipBlock"]["cidr"] for peer in peers]
    assert blocks[:3] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    assert blocks[3:] == [f"10.42.{node}.0/31" for node in range(256)]


@pytest.mark.parametrize(("node_cidrs", "pod_cidr", "expected"), [
    (["192.168.1.0/24"], "10.42.0.0/23", [{"cidr": "192.168.1.0/24"}, {"cidr": "10.42.0.0/31"},
                                          {"cidr": "10.42.1.0/31"}]),
    (["10.0.0.0/8"], "10.42.0.0/24", [{"cidr": "10.0.0.0/8", "except": ["10.42.0.0/24"]},
                                      {"cidr": "10.42.0.0/31"}]),
    (["10.1.0.0/16", "10.2.0.0/16"], "10.42.0.0/24", [{"cidr": "10.1.0.0/16"}, {"cidr": "10.2.0.0/16"},
                                                      {"cidr": "10.42.0.0/31"}]),
    (["fd00::/64"], "10.42.0.0/24", [{"cidr": "fd00::/64"}, {"cidr": "10.42.0.0/31"}]),
])
def test_issuer_peers_from_node_and_pod_networks(node_cidrs: list[str], pod_cidr: str,
                                                 expected: list[dict[str, Any]]) -> None:
    assert install.issuer_peers(node_cidrs, pod_cidr) == [{"ipBlock": block} for block in expected]


@pytest.mark.parametrize(("argv", "says"), [
    (["--node-cidr", "10.42.3.0/24"], "lies inside --pod-cidr"),
    (["--node-cidr", "192.168.1.1/24"], "--node-cidr: 192.168.1.1/24 has host bits set"),
    (["--node-cidr", "nodes"], "--node-cidr"),
    (["--pod-cidr", "10.0.0.0/8"], "more than 1024 node subnets"),
    (["--pod-cidr", "10.42.0.0/25"], "smaller than one node's /24"),
])
def test_install_refuses_node_and_pod_networks_that_make_no_sense(argv: list[str], says: str) -> None:
    code, out, err = run_install(*argv)
    assert (code, out) == (1, "")
    assert says in err


def test_install_node_cidr_is_repeatable_and_replaces_the_default() -> None:
    code, out, _ = run_install("--node-cidr", "192.168.1.0/24", "--node-cidr", "192.168.2.0/24",
                               "--pod-cidr", "10.42.0.0/24")
    assert code == 0
    documents = [d for d in yaml.safe_load_all(out) if d]
    peers = find(documents, "NetworkPolicy", "pinion-issuer")["spec"]["ingress"][0]["from"]
    assert [peer["ipBlock"]["cidr"] for peer in peers] == ["192.168.1.0/24", "192.168.2.0/24", "10.42.0.0/31"]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_keeper_holds_listeners_where_the_agent_hands_them_over(objects: list[dict[str, Any]]) -> None:
    """The agent's --keeper-socket is the keeper's --socket, in the same host directory; the
    keeper's own rollout overlaps (maxSurge, possible as it has no host port), the agent's
    grace period covers its drain."""
    specs = dict(pod_specs(objects))
    agent, keeper = container(objects, "pinion-agent", "agent"), container(objects, "pinion-keeper", "keeper")
    agent_flags = dict(arg.split("=", 1) for arg in agent["args"] if "=" in arg)
    keeper_flags = dict(arg.split("=", 1) for arg in keeper["args"])
    assert agent_flags["--keeper-socket"] == keeper_flags["--socket"] == "/run/pinion/keeper.sock"
    for workload, c in (("pinion-agent", agent), ("pinion-keeper", keeper)):
        mounts = mounts_by_path(c, specs[workload])
        mount, volume = mounts["/run/pinion"]
        assert volume["hostPath"]["path"] == "/run/pinion" and not mount.get("readOnly")
    keeper_set = find(objects, "DaemonSet", "pinion-keeper")
    assert keeper_set["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert not specs["pinion-keeper"].get("hostNetwork") and "ports" not in keeper
    assert specs["pinion-agent"]["terminationGracePeriodSeconds"] >= float(agent_flags["--drain-seconds"]) + 5


# --- multicluster (docs/multicluster.md) ------------------------------------------------------

def multicluster_documents() -> list[dict[str, Any]]:
    from agent.deploy import multicluster

    code, stream, err = run_install("--multicluster", "--linked-trust-domain", "edge.local")
    assert code == 0, err
    remote = multicluster.RemoteCluster("https://203.0.113.7:6443", b"CA", "token", "203.0.113.7:4143",
                                        multicluster.gateway_identity("cloud.local"), "203.0.113.7:4191")
    return [d for d in yaml.safe_load_all(stream) if d] + multicluster.link_manifests("cloud", remote)


def test_multicluster_manifests_validate_against_kubernetes_1_30() -> None:
    for document in multicluster_documents():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_gateway_and_the_mirror_run_commands_pinion_accepts_unprivileged() -> None:
    from agent.viz import multicluster_commands as commands

    documents = multicluster_documents()
    for workload, spec in pod_specs(documents):
        if workload not in ("pinion-gateway", "pinion-mirror-cloud"):
            continue
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
            parsed = cli._parser().parse_args(c["args"])  # an unknown flag would exit 2 here
            assert parsed.run in (commands._run_mc_gateway, commands._run_mc_mirror) and parsed.in_cluster
    accounts = {d["metadata"]["name"] for d in documents if d["kind"] == "ServiceAccount"}
    assert {spec["serviceAccountName"] for _, spec in pod_specs(documents)} <= accounts


def test_kubectl_would_create_every_multicluster_object(api_server: Any, tmp_path: Path) -> None:
    documents = multicluster_documents()
    stream = yaml.safe_dump_all(documents)
    output = kubectl_dry_run(api_server, tmp_path, "-", stdin=stream)
    assert sorted(output) == created(documents)

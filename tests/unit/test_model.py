"""What the agent knows about a pod: capture settings read from CNI args, and the Pod
record that is saved to disk and read back after a restart."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from agent.model import CaptureSettings, InboundPolicy, Pod, PodKey, StateError, parse_duration


def settings(*gateways: str, **args: str) -> CaptureSettings:
    """Capture settings from PINION_* args, for a pod behind these gateways."""
    return CaptureSettings.from_cni_args(args, list(gateways))


def test_no_pinion_args_means_nothing_is_excluded() -> None:
    assert settings() == CaptureSettings()


def test_excluded_ports_are_trimmed_deduplicated_and_sorted() -> None:
    capture = settings(PINION_EXCLUDE_OUTBOUND_PORTS="80, 443,80",
                       PINION_EXCLUDE_INBOUND_PORTS="9100,22,")

    assert capture.exclude_outbound_ports == (80, 443)
    assert capture.exclude_inbound_ports == (22, 9100)


@pytest.mark.parametrize("arg", ["PINION_EXCLUDE_OUTBOUND_PORTS", "PINION_EXCLUDE_INBOUND_PORTS"])
@pytest.mark.parametrize(("value", "message"), [
    ("0", "port 0 out of range"),
    ("65536", "port 65536 out of range"),
    ("-1", "port -1 out of range"),
    ("abc", "invalid literal"),
    ("80;443", "invalid literal"),
])
def test_a_port_that_is_not_a_port_is_refused(arg: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**{arg: value})


def test_excluded_cidrs_are_normalised_to_their_network() -> None:
    capture = settings(PINION_EXCLUDE_OUTBOUND_CIDRS="10.1.2.3/8, 192.168.1.0/24,169.254.169.254")

    assert capture.exclude_outbound_cidrs == ("10.0.0.0/8", "192.168.1.0/24", "169.254.169.254/32")


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-cidr", "10.0.0.300/8"])
def test_a_cidr_that_is_not_one_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        settings(PINION_EXCLUDE_OUTBOUND_CIDRS=value)


def test_kubelet_probes_come_from_the_pods_gateway() -> None:
    assert settings("10.42.0.1").probe_sources == ("10.42.0.1",)


def test_a_dual_stack_pods_ipv6_gateway_does_not_fail_the_capture() -> None:
    """pinion-cni forwards every gateway of the prevResult; the `ip` table is IPv4 only."""
    assert settings("10.42.0.1", "fd00:42::1").probe_sources == ("10.42.0.1",)


WEB = Pod(
    key=PodKey("shop", "web-5d8f"),
    uid="5b1e-42",
    container_id="c0ffee01",
    netns_path="/var/run/netns/cni-1",
    ips=("10.42.0.5",),
    service_account="web",
    inbound=InboundPolicy("mesh-only", ("spiffe://cluster.local/ns/shop/sa/front",)),
    capture=CaptureSettings(
        exclude_outbound_ports=(80, 443),
        exclude_inbound_ports=(22,),
        exclude_outbound_cidrs=("10.0.0.0/8",),
        probe_sources=("10.42.0.1",),
    ),
)


def test_a_pod_survives_a_round_trip_through_json_on_disk() -> None:
    text = json.dumps(WEB.to_json())

    assert Pod.from_json(json.loads(text)) == WEB


def test_the_saved_pod_uses_the_cni_field_names() -> None:
    assert WEB.to_json() == {
        "version": 1,
        "namespace": "shop",
        "name": "web-5d8f",
        "uid": "5b1e-42",
        "containerId": "c0ffee01",
        "netns": "/var/run/netns/cni-1",
        "ips": ["10.42.0.5"],
        "serviceAccount": "web",
        "opaquePorts": [],
        "inboundPolicy": "mesh-only",
        "allowedClients": ["spiffe://cluster.local/ns/shop/sa/front"],
        "cgroup": "",
        "capture": {
            "excludeOutboundPorts": [80, 443],
            "excludeInboundPorts": [22],
            "excludeOutboundCidrs": ["10.0.0.0/8"],
            "probeSources": ["10.42.0.1"],
        },
    }


def test_a_pod_saved_without_optional_fields_reads_back_with_defaults() -> None:
    pod = Pod.from_json({"namespace": "shop", "name": "web", "uid": "", "containerId": "c1",
                         "netns": "/proc/1/ns/net", "ips": []})

    assert pod.service_account == "default"
    assert pod.capture == CaptureSettings()
    assert str(pod.key) == "shop/web"


def test_inbound_policy_comes_from_cni_args_and_rejects_what_it_cannot_enforce() -> None:
    policy = InboundPolicy.from_cni_args({
        "PINION_INBOUND_POLICY": "mesh-only",
        "PINION_ALLOWED_CLIENTS": "spiffe://cluster.local/ns/a/sa/x, spiffe://cluster.local/ns/a/sa/x,"})
    assert policy == InboundPolicy("mesh-only", ("spiffe://cluster.local/ns/a/sa/x",))
    assert not policy.plaintext_allowed
    assert policy.admits("spiffe://cluster.local/ns/a/sa/x")
    assert not policy.admits("spiffe://cluster.local/ns/a/sa/y")
    assert InboundPolicy().plaintext_allowed and InboundPolicy().admits("spiffe://any/ns/a/sa/b")
    with pytest.raises(ValueError, match="mesh-only"):
        InboundPolicy.from_cni_args({"PINION_INBOUND_POLICY": "strict"})
    with pytest.raises(ValueError, match="spiffe"):
        InboundPolicy.from_cni_args({"PINION_ALLOWED_CLIENTS": "web"})


GOOD = WEB.to_json()


@pytest.mark.parametrize(("damage", "says"), [
    pytest.param([], "not a JSON object but list", id="a-list"),
    pytest.param(None, "not a JSON object but NoneType", id="null"),
    pytest.param({**GOOD, "ips": 5}, "'ips' must be a list of strings", id="ips-a-number"),
    pytest.param({**GOOD, "ips": ["10.42.0.999"]}, "'ips' holds '10.42.0.999'", id="ips-not-addresses"),
    pytest.param({k: v for k, v in GOOD.items() if k != "netns"}, "'netns' is missing", id="no-netns"),
    pytest.param({**GOOD, "uid": 7}, "'uid' must be a string", id="uid-a-number"),
    pytest.param({**GOOD, "opaquePorts": [0]}, "'opaquePorts' must be a list of ports", id="port-0"),
    pytest.param({**GOOD, "opaquePorts": [True]}, "'opaquePorts' must be a list of ports", id="port-bool"),
    pytest.param({**GOOD, "capture": []}, "'capture' must be an object", id="capture-a-list"),
    pytest.param({**GOOD, "owner": "web"}, "'owner' must be an object", id="owner-a-string"),
    pytest.param({**GOOD, "inboundPolicy": "open"}, "inbound policy must be one of", id="policy-unknown"),
    pytest.param({**GOOD, "version": 2}, "version 2: this agent reads version 1", id="future-version"),
])
def test_a_damaged_saved_pod_is_a_state_error_naming_what_is_wrong(damage: object, says: str) -> None:
    with pytest.raises(StateError, match=re.escape(says)):
        Pod.from_json(damage)


def test_a_file_from_before_versions_reads_as_version_1() -> None:
    assert Pod.from_json({k: v for k, v in GOOD.items() if k != "version"}) == WEB


@pytest.mark.parametrize(("text", "seconds"), [("", 0.0), ("90", 90.0), ("90s", 90.0), ("15m", 900.0),
                                                ("1h", 3600.0), ("0.5", 0.5)])
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-5", "0", "1d", "h", "forever", "1e12"])
def test_a_duration_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_pods_idle_timeout_is_remembered() -> None:
    pod = dataclasses.replace(WEB, idle_timeout=300.0)
    assert pod.to_json()["idleTimeout"] == 300.0
    assert Pod.from_json(pod.to_json()) == pod
    with pytest.raises(StateError, match="'idleTimeout' must be a number of seconds"):
        Pod.from_json({**pod.to_json(), "idleTimeout": "5m"})

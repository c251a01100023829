"""The `authority` label: a valid host[:port] from the request, and at most MAX_AUTHORITIES
values per pod and direction, so a client sending ever new Host headers cannot mint series."""

from __future__ import annotations

from typing import cast

from agent.core.accounting import authority_label
from agent.core.telemetry import MAX_AUTHORITIES, PLAINTEXT, HttpLabels, PeerLabels
from agent.dataplane.context import PodContext
from agent.dataplane.netns import NetNs


def test_label_values_are_host_names_or_ips_with_a_port() -> None:
    assert authority_label(b"Web.Shop.svc.cluster.local:8080") == "web.shop.svc.cluster.local:8080"
    assert authority_label(b"10.42.0.7") == "10.42.0.7"
    assert authority_label(b"[fd00::1]:80") == "[fd00::1]:80"
    for bad in (b"", b"web/../x", b'web"', b"web:port", b"-web", b"a" * 254, b"\xff"):
        assert authority_label(bad) == "", bad


def test_past_the_bound_requests_are_counted_without_the_label() -> None:
    pod = PodContext("shop", "web", cast(NetNs, None), frozenset())
    names = [f"host-{index}.example" for index in range(MAX_AUTHORITIES + 5)]
    labels = [pod.http_labels("inbound", PLAINTEXT, name) for name in names]

    assert [label.authority for label in labels[:MAX_AUTHORITIES]] == names[:MAX_AUTHORITIES]
    assert {label.authority for label in labels[MAX_AUTHORITIES:]} == {""}
    assert pod.http_labels("inbound", PLAINTEXT, names[0]).authority == names[0]  # known: kept
    assert pod.http_labels("outbound", PLAINTEXT, names[-1]).authority == names[-1]  # per direction


def test_a_known_authority_reuses_its_label_set_and_the_cache_stays_bounded() -> None:
    pod = PodContext("shop", "web", cast(NetNs, None), frozenset())
    first = pod.http_labels("inbound", PLAINTEXT, "web.shop")

    assert pod.http_labels("inbound", PLAINTEXT, "web.shop") is first  # built once, not per connection
    assert first == HttpLabels("inbound", "shop", "web", PLAINTEXT, authority="web.shop")
    peers = [PeerLabels(tls="true", client_id=f"spiffe://cluster.local/ns/a/sa/c{index}")
             for index in range(200)]
    for peer in peers:  # peers come and go: the cache never holds more than its bound
        assert pod.http_labels("inbound", peer, "web.shop").peer_labels is peer
    assert len(pod.authority_labels) <= 64

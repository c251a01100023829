"""SPIFFE IDs: exactly spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, nothing looser."""

from __future__ import annotations

import pytest

from agent.identity.spiffe import SpiffeId, check_trust_domain, for_pod


def test_a_pod_identity_prints_as_its_uri_and_parses_back() -> None:
    identity = for_pod("cluster.local", "shop", "cart")

    assert str(identity) == "spiffe://cluster.local/ns/shop/sa/cart"
    assert SpiffeId.parse(str(identity)) == identity
    assert identity == SpiffeId(trust_domain="cluster.local", namespace="shop", service_account="cart")


def test_identities_are_hashable_so_policies_can_hold_sets_of_them() -> None:
    allowed = frozenset({SpiffeId.parse("spiffe://td/ns/a/sa/x"), SpiffeId.parse("spiffe://td/ns/a/sa/x")})

    assert len(allowed) == 1


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/shop/sa/cart/extra",
    "spiffe://cluster.local/ns/shop/sa/",
    "spiffe://cluster.local/ns/shop",
    "spiffe://cluster.local/sa/cart/ns/shop",
    "spiffe://cluster.local:8443/ns/shop/sa/cart",
    "spiffe://Cluster.Local/ns/shop/sa/cart",
    "spiffe://user@cluster.local/ns/shop/sa/cart",
    "spiffe://cluster.local/ns/shop/sa/cart?x=1",
    "spiffe://cluster.local/ns/shop/sa/cart#frag",
    "spiffe://cluster.local/ns/../sa/cart",
    "spiffe://cluster.local/ns/sh%2Fop/sa/cart",
    "spiffe:///ns/shop/sa/cart",
    "SPIFFE://cluster.local/ns/shop/sa/cart",
    "https://cluster.local/ns/shop/sa/cart",
    "spiffe://cluster.local//ns/shop/sa/cart",
    "",
])
def test_anything_but_the_kubernetes_shape_is_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(uri)


def test_building_an_identity_checks_its_parts() -> None:
    with pytest.raises(ValueError, match="namespace"):
        for_pod("cluster.local", "shop/evil", "cart")
    with pytest.raises(ValueError, match="service account"):
        for_pod("cluster.local", "shop", "")
    with pytest.raises(ValueError, match="trust domain"):
        for_pod("Cluster.Local", "shop", "cart")


def test_trust_domain_names() -> None:
    assert check_trust_domain("prod.example-1_x") == "prod.example-1_x"
    for bad in ("", "UPPER", "has space", "a/b", "..", "x:1"):
        with pytest.raises(ValueError):
            check_trust_domain(bad)

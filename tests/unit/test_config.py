"""Every agent setting is read once, from one mapping of strings (flags over env), into a
frozen Config; a bad value is refused with a message that names it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from agent.config import DEFAULT_PROXY_MARK, Config, Ports, parse_host_port


def test_only_the_node_name_is_needed_and_the_rest_has_defaults() -> None:
    config = Config.from_mapping({"node_name": "pi-1"})

    assert config == Config(
        node_name="pi-1",
        admin_host="127.0.0.1",
        admin_port=4191,
        cni_socket=Path("/run/pinion/cni.sock"),
        state_dir=Path("/var/lib/pinion"),
        identity_dir=None,
        pending_dir=Path("/run/pinion/pending"),
        redirect="auto",
        proxy_mark=DEFAULT_PROXY_MARK,
        ports=Ports(outbound=15001, inbound=15006, tunnel=15008),
        metrics_grace_seconds=300.0,
        sweep_interval_seconds=10.0,
        log_level="info",
    )


def test_every_given_setting_is_taken() -> None:
    config = Config.from_mapping({
        "node_name": "pi-2",
        "admin_addr": "0.0.0.0:9991",
        "cni_socket": "/tmp/p/cni.sock",
        "state_dir": "/tmp/p/state",
        "identity_dir": "/tmp/p/identity",
        "pending_dir": "/tmp/p/pending",
        "redirect": "nftables",
        "proxy_mark": "0x539",
        "metrics_grace_seconds": "60",
        "sweep_interval_seconds": "2.5",
        "log_level": "debug",
    })

    assert (config.node_name, config.admin_host, config.admin_port) == ("pi-2", "0.0.0.0", 9991)
    assert config.cni_socket == Path("/tmp/p/cni.sock")
    assert config.state_dir == Path("/tmp/p/state")
    assert config.identity_dir == Path("/tmp/p/identity")
    assert config.pending_dir == Path("/tmp/p/pending")
    assert config.redirect == "nftables"
    assert config.proxy_mark == 0x539
    assert (config.metrics_grace_seconds, config.sweep_interval_seconds) == (60.0, 2.5)
    assert config.log_level == "debug"


def test_unset_and_empty_values_both_mean_the_default() -> None:
    """An environment variable set to "" must not override a default with nothing."""
    config = Config.from_mapping({"node_name": "pi-1", "admin_addr": "", "redirect": None,
                                  "state_dir": ""})

    assert (config.admin_host, config.admin_port) == ("127.0.0.1", 4191)
    assert config.redirect == "auto"
    assert config.state_dir == Path("/var/lib/pinion")


def test_a_config_cannot_be_changed_once_built() -> None:
    config = Config.from_mapping({"node_name": "pi-1"})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node_name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("values", [{}, {"node_name": ""}, {"node_name": None}])
def test_without_a_node_name_the_agent_says_how_to_give_one(values: dict[str, str | None]) -> None:
    with pytest.raises(ValueError, match=r"node name is required \(--node-name or PINION_NODE_NAME\)"):
        Config.from_mapping(values)


def test_an_admin_address_that_is_not_ip_port_is_refused() -> None:
    with pytest.raises(ValueError, match="expected IP:PORT, got 'nope'"):
        Config.from_mapping({"node_name": "pi-1", "admin_addr": "nope"})


@pytest.mark.parametrize("admin_addr", ["127.0.0.1:70000", "127.0.0.1:65536", "127.0.0.1:0",
                                        "127.0.0.1:-1", "127.0.0.1:", ":4191"])
def test_an_admin_port_out_of_range_or_missing_is_refused(admin_addr: str) -> None:
    with pytest.raises(ValueError, match="expected IP:PORT"):
        Config.from_mapping({"node_name": "pi-1", "admin_addr": admin_addr})


def test_an_unknown_redirect_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="--redirect must be one of auto, iptables, nftables, ebpf, "
                                         "not 'bpf'"):
        Config.from_mapping({"node_name": "pi-1", "redirect": "bpf"})


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4191", ("127.0.0.1", 4191)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:4191", ("::1", 4191)),
    ("[::]:65535", ("::", 65535)),
])
def test_parse_host_port_takes_ipv4_and_bracketed_ipv6(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", "4191", "[::1]", "127.0.0.1:http", "127.0.0.1:65536"])
def test_parse_host_port_refuses_what_is_not_host_and_port(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"expected IP:PORT, got {text!r}")):
        parse_host_port(text)

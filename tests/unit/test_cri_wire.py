"""The CRI client's protobuf wire format (tests/support/cri.py), against bytes worked out by
hand from the encoding rules, so the containerd lane's messages mean what they say."""

from __future__ import annotations

from tests.support.cri import Container, Mount, PodSandbox, decode, encode


def test_scalars_strings_and_nested_messages_encode_by_field_number() -> None:
    assert encode((1, "ab")) == b"\x0a\x02ab"                 # field 1, length-delimited
    assert encode((2, 300)) == b"\x10\xac\x02"                # field 2, varint 300
    assert encode((3, True), (4, False), (5, None), (6, 0)) == b"\x18\x01"  # proto3 defaults left out
    assert encode((7, -1)) == b"\x38" + b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes
    assert encode((1, encode((1, "x")))) == b"\x0a\x03\x0a\x01x"
    assert encode((1, b"")) == b"\x0a\x00"                     # an empty message is still present


def test_repeated_fields_and_maps() -> None:
    assert encode((1, ["a", "b"])) == b"\x0a\x01a\x0a\x01b"
    assert encode((6, {"k": "v"})) == b"\x32\x06\x0a\x01k\x12\x01v"
    assert decode(encode((6, {"b": "2", "a": "1"}))).mapping(6) == {"a": "1", "b": "2"}


def test_decode_reads_back_what_encode_wrote() -> None:
    message = decode(encode((1, "id"), (3, 2), (5, encode((1, "10.42.0.2")))))
    assert message.text(1) == "id" and message.integer(3) == 2
    assert message.message(5).text(1) == "10.42.0.2"
    assert message.integer(9) == 0 and message.text(9) == "" and message.messages(9) == []


def test_a_host_network_sandbox_has_no_hostname_and_the_node_network_mode() -> None:
    pod = decode(PodSandbox(name="agent", uid="u", namespace="ns", host_network=True,
                            cgroup_parent="/kubepods/besteffort/podu").config())
    assert pod.message(1).text(1) == "agent" and pod.message(1).text(3) == "ns"
    assert pod.text(2) == ""                                   # kubelet: the node's UTS
    linux = pod.message(8)
    assert linux.text(1) == "/kubepods/besteffort/podu"
    assert linux.message(2).message(1).integer(1) == 2          # NamespaceMode NODE
    assert decode(PodSandbox(name="web", uid="u").config()).text(2) == "web"


def test_a_container_carries_the_security_context_kubelet_maps() -> None:
    config = decode(Container(
        name="agent", image="localhost/pinion:dev", attempt=1, command=["pinion", "agent"],
        env={"A": "1"}, mounts=[Mount("/run/netns", "/run/netns", propagation=1)],
        run_as_user=0, readonly_rootfs=True, no_new_privs=True,
        add_capabilities=["NET_ADMIN", "BPF"], drop_capabilities=["ALL"], cpu_shares=51,
        memory_limit_bytes=256 << 20).config())
    assert config.message(1).text(1) == "agent" and config.message(1).integer(2) == 1
    assert config.message(2).text(1) == "localhost/pinion:dev"
    assert config.texts(3) == ["pinion", "agent"]
    mount = config.messages(7)[0]
    assert (mount.text(1), mount.text(2), mount.integer(5)) == ("/run/netns", "/run/netns", 1)
    resources = config.message(15).message(1)
    assert resources.integer(3) == 51 and resources.integer(4) == 256 << 20
    security = config.message(15).message(2)
    capabilities = security.message(1)
    assert capabilities.texts(1) == ["NET_ADMIN", "BPF"] and capabilities.texts(2) == ["ALL"]
    assert 5 in security.fields and security.message(5).integer(1) == 0  # runAsUser: 0, present
    assert security.integer(7) == 1 and security.integer(11) == 1    # read-only root, no_new_privs
    assert "/proc/kcore" in security.texts(13)                          # kubelet's masked paths

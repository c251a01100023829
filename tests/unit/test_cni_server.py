"""The agent's side of the CNI conversation: one JSON request line in, one JSON reply out,
with CNI error codes the plugin hands on to the container runtime. Also the replay of
requests a fail-open plugin spooled while the agent was away.

A FakePods stands in for the PodManager and records what it was asked to do."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.core.telemetry import Telemetry
from agent.inpod.cni_server import CniServer, StandaloneAdmission, replay_pending
from agent.inpod.errors import CaptureError
from agent.model import CaptureSettings, Pod, PodKey
from agent.observability.exposition import CollectorRegistry, generate_latest
from agent.observability.metrics import build_registry

T = TypeVar("T")

CART_ARGS = {
    "K8S_POD_NAMESPACE": "shop",
    "K8S_POD_NAME": "cart-7d9f",
    "K8S_POD_UID": "5b1e-42",
    "K8S_POD_INFRA_CONTAINER_ID": "c0ffee01",
}
CART = Pod(
    key=PodKey("shop", "cart-7d9f"),
    uid="5b1e-42",
    container_id="c0ffee01",
    netns_path="/var/run/netns/cni-1",
    ips=("10.42.0.5",),
    service_account="default",
    capture=CaptureSettings(probe_sources=("10.42.0.1",)),
)


class FakePods:
    """Records add/delete/check; `fail_with` makes add raise, `problems` is what check finds."""

    def __init__(self) -> None:
        self.added: list[Pod] = []
        self.deleted: list[str] = []
        self.checked: list[str] = []
        self.problems: list[str] = []
        self.fail_with: Exception | None = None

    async def add(self, pod: Pod) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.added.append(pod)

    async def delete(self, container_id: str) -> bool:
        self.deleted.append(container_id)
        return True

    async def check(self, container_id: str) -> list[str]:
        self.checked.append(container_id)
        return list(self.problems)


def request(command: str = "ADD", **changes: Any) -> dict[str, Any]:
    """A request as pinion-cni sends it for the cart pod; `args` entries merge into CART_ARGS."""
    args = {**CART_ARGS, **changes.pop("args", {})}
    base = {"version": 1, "command": command, "containerId": "c0ffee01",
            "netns": "/var/run/netns/cni-1", "ifName": "eth0", "args": args,
            "ips": ["10.42.0.5"], "gateways": ["10.42.0.1"], "cniVersion": "1.0.0"}
    return {**base, **changes}


def line(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\n"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.pods = FakePods()
        self.registry: CollectorRegistry
        self.registry, metrics = build_registry(Telemetry(lambda: 0.0, 300.0))
        self.server = CniServer(tmp_path / "cni.sock", self.pods, metrics)

    def send(self, raw: bytes) -> dict[str, Any]:
        return run(self.server.handle_line(raw))

    def cni_request_counts(self) -> list[str]:
        lines = generate_latest(self.registry).decode().splitlines()
        return [sample for sample in lines if sample.startswith("pinion_cni_requests_total{")]


@pytest.fixture
def agent(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# ---------------------------------------------------------------- requests that cannot be read


@pytest.mark.parametrize("raw", [b"{not json\n", b"\n", b"\xff\xfe\n"])
def test_a_line_that_is_not_json_is_a_decode_failure(agent: Harness, raw: bytes) -> None:
    reply = agent.send(raw)

    assert reply["ok"] is False
    assert reply["code"] == 6
    assert reply["msg"].startswith("malformed request from pinion-cni: ")
    assert agent.cni_request_counts() == ['pinion_cni_requests_total{command="unknown",result="error"} 1.0']


@pytest.mark.parametrize("body", [b"[]", b'"ADD"', b"42", b"null"])
def test_json_that_is_not_an_object_is_a_decode_failure(agent: Harness, body: bytes) -> None:
    reply = agent.send(body + b"\n")

    assert reply == {"ok": False, "code": 6, "details": "",
                     "msg": "malformed request from pinion-cni: not a JSON object"}


@pytest.mark.parametrize(("changes", "code", "says"), [
    pytest.param({"ips": 5}, 6, "ips is not a list of addresses", id="ips-a-number"),
    pytest.param({"ips": [5]}, 6, "ips is not a list of addresses", id="ips-of-numbers"),
    pytest.param({"gateways": "10.42.0.1"}, 6, "gateways is not a list of addresses", id="gateways-a-string"),
    pytest.param({"netns": ["/proc/1/ns/net"]}, 6, "netns is not a string", id="netns-a-list"),
    pytest.param({"command": 1}, 6, "command is not a string", id="command-a-number"),
    pytest.param({"args": {"K8S_POD_NAME": 7}}, 4, "CNI_ARGS must be key=value pairs", id="args-not-text"),
])
def test_fields_of_the_wrong_type_get_a_clear_code_and_no_traceback(
        agent: Harness, caplog: pytest.LogCaptureFixture, changes: dict[str, Any], code: int,
        says: str) -> None:
    reply = agent.send(line({**request("ADD"), **changes}))

    assert (reply["ok"], reply["code"]) == (False, code) and says in reply["msg"]
    assert not [r for r in caplog.records if r.exc_info]  # no "unexpected failure" traceback
    assert agent.pods.added == []


def test_absurd_nesting_is_a_decode_failure(agent: Harness) -> None:
    reply = agent.send(b"[" * 100_000 + b"\n")

    assert (reply["ok"], reply["code"]) == (False, 6)


def test_a_request_over_64_kib_gets_a_clear_refusal_over_the_socket(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        agent = Harness(tmp_path)
        await agent.server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "cni.sock"))
            big = {**request("ADD"), "prevResult": {"padding": "x" * 100_000}}
            writer.write(line(big))
            answer = json.loads(await reader.readline())
            writer.close()
            return dict(answer)
        finally:
            await agent.server.close()

    reply = run(main())
    assert reply == {"ok": False, "code": 6, "details": "",
                     "msg": "request from pinion-cni is over 64 KiB: not read"}


# ---------------------------------------------------------------- ADD


def test_add_captures_the_pod_the_request_describes(agent: Harness) -> None:
    reply = agent.send(line(request("ADD")))

    assert reply == {"ok": True}
    assert agent.pods.added == [CART]
    assert agent.cni_request_counts() == ['pinion_cni_requests_total{command="add",result="ok"} 1.0']


def test_add_takes_the_service_account_and_exclusions_from_pinion_args(agent: Harness) -> None:
    agent.send(line(request("ADD", args={
        "PINION_SERVICE_ACCOUNT": "cart",
        "PINION_EXCLUDE_OUTBOUND_PORTS": "5432, 443",
        "PINION_EXCLUDE_OUTBOUND_CIDRS": "10.96.0.10/12",
    })))

    [pod] = agent.pods.added
    assert pod.service_account == "cart"
    assert pod.capture == CaptureSettings(exclude_outbound_ports=(443, 5432),
                                          exclude_outbound_cidrs=("10.96.0.0/12",),
                                          probe_sources=("10.42.0.1",))


def test_the_command_is_read_case_insensitively(agent: Harness) -> None:
    assert agent.send(line(request("add"))) == {"ok": True}
    assert agent.pods.added == [CART]


@pytest.mark.parametrize("missing", ["K8S_POD_NAME", "K8S_POD_NAMESPACE"])
def test_add_without_the_pods_name_or_namespace_names_what_is_missing(
        agent: Harness, missing: str) -> None:
    body = request("ADD")
    del body["args"][missing]

    reply = agent.send(line(body))

    assert reply["ok"] is False
    assert reply["code"] == 4
    assert reply["msg"] == f"CNI_ARGS lacks {missing}; pinion-cni needs the pod's namespace and name"
    assert agent.pods.added == []


@pytest.mark.parametrize("field", ["containerId", "netns"])
def test_add_without_a_container_or_netns_is_refused(agent: Harness, field: str) -> None:
    body = request("ADD")
    del body[field]

    assert agent.send(line(body)) == {"ok": False, "code": 4, "msg": f"request lacks {field}",
                                      "details": ""}
    assert agent.pods.added == []


def test_add_with_args_that_are_not_pairs_is_refused(agent: Harness) -> None:
    reply = agent.send(line(request("ADD") | {"args": "K8S_POD_NAME=cart"}))

    assert (reply["code"], reply["msg"]) == (4, "CNI_ARGS must be key=value pairs")


def test_add_with_a_bad_pinion_arg_says_which_value_was_wrong(agent: Harness) -> None:
    reply = agent.send(line(request("ADD", args={"PINION_EXCLUDE_INBOUND_PORTS": "0"})))

    assert (reply["code"], reply["msg"]) == (4, "bad PINION_* CNI arg: port 0 out of range")
    assert agent.pods.added == []


@pytest.mark.parametrize("value", ["disabled", "Disabled", "DISABLED"])
def test_a_pod_that_opted_out_is_acknowledged_and_left_alone(agent: Harness, value: str) -> None:
    reply = agent.send(line(request("ADD", args={"PINION_MESH": value})))

    assert reply == {"ok": True}
    assert agent.pods.added == []


def test_an_opted_out_pod_is_not_even_validated(agent: Harness) -> None:
    """Opting out must work for pods whose other args pinion would refuse."""
    body = request("ADD", args={"PINION_MESH": "disabled", "PINION_EXCLUDE_OUTBOUND_PORTS": "abc"})
    del body["netns"]

    assert agent.send(line(body)) == {"ok": True}


def test_a_capture_error_from_the_pod_manager_reaches_the_plugin_as_it_is(
        agent: Harness, caplog: pytest.LogCaptureFixture) -> None:
    agent.pods.fail_with = CaptureError(5, "capturing pod shop/cart-7d9f: no such netns",
                                        "netns /var/run/netns/cni-1")

    with caplog.at_level(logging.WARNING, logger="agent.inpod.cni_server"):
        reply = agent.send(line(request("ADD")))

    assert reply == {"ok": False, "code": 5,
                     "msg": "capturing pod shop/cart-7d9f: no such netns",
                     "details": "netns /var/run/netns/cni-1"}
    assert agent.cni_request_counts() == ['pinion_cni_requests_total{command="add",result="error"} 1.0']
    assert "cni ADD failed: capturing pod shop/cart-7d9f: no such netns" in caplog.messages


def test_an_unexpected_failure_still_gets_an_error_reply(agent: Harness) -> None:
    agent.pods.fail_with = RuntimeError("nft: Operation not permitted")

    reply = agent.send(line(request("ADD")))

    assert reply["ok"] is False
    assert agent.cni_request_counts() == ['pinion_cni_requests_total{command="add",result="error"} 1.0']


# ---------------------------------------------------------------- DEL, CHECK and the rest


def test_del_releases_the_pod_by_container_id(agent: Harness) -> None:
    assert agent.send(line(request("DEL"))) == {"ok": True}
    assert agent.pods.deleted == ["c0ffee01"]


def test_del_of_an_opted_out_pod_still_releases_whatever_is_there(agent: Harness) -> None:
    assert agent.send(line(request("DEL", args={"PINION_MESH": "disabled"}))) == {"ok": True}
    assert agent.pods.deleted == ["c0ffee01"]


def test_del_without_a_container_id_is_refused(agent: Harness) -> None:
    body = request("DEL")
    del body["containerId"]

    assert agent.send(line(body)) == {"ok": False, "code": 4, "msg": "DEL without containerId",
                                      "details": ""}
    assert agent.pods.deleted == []


def test_check_of_a_fully_captured_pod_is_ok(agent: Harness) -> None:
    assert agent.send(line(request("CHECK"))) == {"ok": True}
    assert agent.pods.checked == ["c0ffee01"]


def test_check_lists_every_problem_it_finds(agent: Harness) -> None:
    agent.pods.problems = ["rule pinion/inbound-capture missing", "listener ('0.0.0.0', 15006) closed"]

    reply = agent.send(line(request("CHECK")))

    assert reply == {"ok": False, "code": 7, "details": "",
                     "msg": "pod is not fully captured: rule pinion/inbound-capture missing; "
                            "listener ('0.0.0.0', 15006) closed"}


def test_check_of_an_opted_out_pod_has_nothing_to_check(agent: Harness) -> None:
    agent.pods.problems = ["pod with container id c0ffee01 is not captured by this agent"]

    assert agent.send(line(request("CHECK", args={"PINION_MESH": "disabled"}))) == {"ok": True}
    assert agent.pods.checked == []


@pytest.mark.parametrize("command", ["VERSION", "GC", ""])
def test_an_unknown_command_is_refused_by_name(agent: Harness, command: str) -> None:
    reply = agent.send(line(request(command)))

    assert (reply["ok"], reply["code"]) == (False, 4)
    assert reply["msg"] == f"unknown CNI command {command!r}"
    assert (agent.pods.added, agent.pods.deleted, agent.pods.checked) == ([], [], [])


def test_each_request_is_counted_once_by_command_and_result(agent: Harness) -> None:
    agent.send(line(request("ADD")))
    agent.send(line(request("ADD")))
    agent.send(line(request("CHECK")))
    agent.send(line(request("DEL")))
    agent.send(b"{not json\n")

    assert agent.cni_request_counts() == [
        'pinion_cni_requests_total{command="add",result="ok"} 2.0',
        'pinion_cni_requests_total{command="check",result="ok"} 1.0',
        'pinion_cni_requests_total{command="del",result="ok"} 1.0',
        'pinion_cni_requests_total{command="unknown",result="error"} 1.0',
    ]


# ---------------------------------------------------------------- replaying spooled ADDs


def spool(directory: Path, name: str, body: dict[str, Any] | str) -> Path:
    path = directory / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def test_replay_captures_every_spooled_pod_and_forgets_the_files(tmp_path: Path) -> None:
    pods = FakePods()
    spool(tmp_path, "c0ffee01.json", request("ADD"))
    spool(tmp_path, "c0ffee02.json", request("ADD", containerId="c0ffee02",
                                             args={"K8S_POD_NAME": "cart-2"}))

    captured = run(replay_pending(tmp_path, StandaloneAdmission(pods)))

    assert captured == 2
    assert [(str(p.key), p.container_id) for p in pods.added] == [
        ("shop/cart-7d9f", "c0ffee01"), ("shop/cart-2", "c0ffee02")]
    assert list(tmp_path.iterdir()) == []


def test_replay_skips_opted_out_pods_but_still_forgets_them(tmp_path: Path) -> None:
    pods = FakePods()
    spool(tmp_path, "c0ffee01.json", request("ADD", args={"PINION_MESH": "disabled"}))

    assert run(replay_pending(tmp_path, StandaloneAdmission(pods))) == 0
    assert pods.added == []
    assert list(tmp_path.iterdir()) == []


def test_replay_leaves_files_that_are_not_spooled_requests(tmp_path: Path) -> None:
    """The plugin writes `.<id>.XXXX` temporaries before renaming them into place."""
    pods = FakePods()
    temporary = spool(tmp_path, ".c0ffee01.abcd", request("ADD"))

    assert run(replay_pending(tmp_path, StandaloneAdmission(pods))) == 0
    assert list(tmp_path.iterdir()) == [temporary]


def test_replay_survives_an_unreadable_file_deletes_it_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pods = FakePods()
    spool(tmp_path, "a-broken.json", "{truncated")
    spool(tmp_path, "b-good.json", request("ADD"))

    with caplog.at_level(logging.WARNING, logger="agent.inpod.cni_server"):
        captured = run(replay_pending(tmp_path, StandaloneAdmission(pods)))

    assert captured == 1
    assert pods.added == [CART]
    assert list(tmp_path.iterdir()) == []
    assert any(m.startswith("pending request a-broken.json unreadable: ") for m in caplog.messages)


def test_replay_drops_a_pod_it_cannot_capture_and_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pods = FakePods()
    body = request("ADD")
    del body["args"]["K8S_POD_NAME"]
    spool(tmp_path, "c0ffee01.json", body)

    with caplog.at_level(logging.WARNING, logger="agent.inpod.cni_server"):
        assert run(replay_pending(tmp_path, StandaloneAdmission(pods))) == 0

    assert list(tmp_path.iterdir()) == []
    assert any(m.startswith("pending pod c0ffee01.json not captured: CNI_ARGS lacks K8S_POD_NAME")
               for m in caplog.messages)


def test_replay_of_a_directory_that_does_not_exist_does_nothing(tmp_path: Path) -> None:
    assert run(replay_pending(tmp_path / "absent", StandaloneAdmission(FakePods()))) == 0


def test_replay_survives_a_file_that_is_json_but_not_a_request(tmp_path: Path) -> None:
    pods = FakePods()
    spool(tmp_path, "a-list.json", "[]")
    spool(tmp_path, "b-good.json", request("ADD"))

    assert run(replay_pending(tmp_path, StandaloneAdmission(pods))) == 1
    assert pods.added == [CART]
    assert list(tmp_path.iterdir()) == []


def test_a_pods_idle_timeout_comes_from_its_cni_args(agent: Harness) -> None:
    reply = agent.send(line(request("ADD", args={**request("ADD")["args"], "PINION_IDLE_TIMEOUT": "5m"})))

    assert reply == {"ok": True} and agent.pods.added[0].idle_timeout == 300.0
    refused = agent.send(line(request("ADD", args={**request("ADD")["args"], "PINION_IDLE_TIMEOUT": "soon"})))
    assert (refused["ok"], refused["code"]) == (False, 4) and "PINION_" in refused["msg"]

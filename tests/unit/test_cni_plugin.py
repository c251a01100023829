"""pinion-cni, run as the container runtime runs it: a subprocess fed a network config on
stdin and CNI_* variables, talking to a fake agent on a Unix socket. Every test runs twice:
against cni/pinion-cni (the static C binary nodes run, built by `make cni`) and against
cni/pinion_cni_reference.py, its reference; test_cni_plugin_differential.py compares the two
on generated input.

Set PINION_CNI_PYTHON (e.g. to a python3.9) to run the reference under another interpreter,
PINION_CNI_BINARY to test another build of the C plugin (another arch's, under qemu-user).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "cni" / "pinion_cni_reference.py"
# PINION_CNI_BINARY: another build of it, e.g. an arm64 one run through qemu-user's binfmt
C_PLUGIN = Path(os.environ.get("PINION_CNI_BINARY")
                or Path(__file__).resolve().parents[2] / "cni" / "pinion-cni")
PYTHON = os.environ.get("PINION_CNI_PYTHON", sys.executable)
IMPLEMENTATIONS = {"python": [PYTHON, str(REFERENCE)], "c": [str(C_PLUGIN)]}
ARGV = IMPLEMENTATIONS["python"]  # the implementation under test (the fixture below sets it)


def require_c_plugin() -> None:
    if not C_PLUGIN.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{C_PLUGIN} is not built (make cni)")
        pytest.skip(f"{C_PLUGIN} is not built (make cni)")


@pytest.fixture(autouse=True, params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c":
        require_c_plugin()
    monkeypatch.setattr(sys.modules[__name__], "ARGV", IMPLEMENTATIONS[request.param])
    return str(request.param)

OK = {"ok": True}
CLOSE_WITHOUT_REPLY = "close without reply"
NEVER_ANSWER = "never answer"

POD_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9f;"
    "K8S_POD_INFRA_CONTAINER_ID=c0ffee01;K8S_POD_UID=5b1e-42;"
    "PINION_SERVICE_ACCOUNT=cart;PINION_MODE=capture"
)
POD_ARGS_PARSED = {
    "IgnoreUnknown": "1",
    "K8S_POD_NAMESPACE": "shop",
    "K8S_POD_NAME": "cart-7d9f",
    "K8S_POD_INFRA_CONTAINER_ID": "c0ffee01",
    "K8S_POD_UID": "5b1e-42",
    "PINION_SERVICE_ACCOUNT": "cart",
    "PINION_MODE": "capture",
}

# What `bridge` + `host-local` hand on, in each result format pinion-cni accepts.
PREV_RESULT_1_0_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "7a:1c:00:00:00:01"},
        {"name": "veth8a1b", "mac": "7a:1c:00:00:00:02"},
        {"name": "eth0", "mac": "7a:1c:00:00:00:03", "sandbox": "/var/run/netns/cni-1"},
    ],
    "ips": [
        {"address": "10.42.0.5/24", "gateway": "10.42.0.1", "interface": 2},
        {"address": "fd00:42::5/64", "gateway": "fd00:42::1", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
PREV_RESULT_0_4_0 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [{"version": "4", "address": "10.42.0.7/24", "gateway": "10.42.0.1", "interface": 0}],
    "dns": {},
}
PREV_RESULT_0_3_1 = {
    "cniVersion": "0.3.1",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [
        {"version": "4", "address": "10.42.0.8/24", "gateway": "10.42.0.1", "interface": 0},
        {"version": "4", "address": "10.42.0.9/24", "gateway": "10.42.0.1", "interface": 0},
    ],
}


class FakeAgent:
    """Stands in for the pinion agent: records each request line, answers as told.

    answer: a reply object (sent as one JSON line), raw bytes, CLOSE_WITHOUT_REPLY or
    NEVER_ANSWER (holds the connection open until the test ends).
    """

    def __init__(self, socket_path: Path, answer: Any = OK) -> None:
        self.socket_path = socket_path
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(None)
                self.requests.append(json.loads(connection.makefile("rb").readline()))
                if self.answer == NEVER_ANSWER:
                    self._stopping.wait()
                elif isinstance(self.answer, bytes):
                    connection.sendall(self.answer)
                elif self.answer != CLOSE_WITHOUT_REPLY:
                    connection.sendall(json.dumps(self.answer).encode() + b"\n")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()


@dataclass
class PluginRun:
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    def output(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Stands in for /run/pinion; under /tmp so the socket path stays short."""
    path = Path(tempfile.mkdtemp(prefix="pcni-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_agent(run_dir: Path) -> Iterator[Any]:
    agents: list[FakeAgent] = []

    def start(answer: Any = OK) -> FakeAgent:
        agents.append(FakeAgent(run_dir / "cni.sock", answer))
        return agents[-1]

    yield start
    for agent in agents:
        agent.stop()


def pinion_config(
    run_dir: Path, prev_result: dict[str, Any] | None = PREV_RESULT_1_0_0, **keys: Any
) -> dict[str, Any]:
    """The pinion-cni entry of a conflist, as the runtime hands it to the plugin."""
    config: dict[str, Any] = {
        "cniVersion": keys.pop("cniVersion", "1.0.0"),
        "name": "k8s-pod-network",
        "type": "pinion-cni",
        "agentSocket": str(run_dir / "cni.sock"),
        "pendingDir": str(run_dir / "pending"),
        "timeoutSeconds": 5,
    }
    if prev_result is not None:
        config["prevResult"] = prev_result
    config.update(keys)
    return config


def invoke(command: str, config: dict[str, Any] | str, **env: str | None) -> PluginRun:
    """Run the plugin like a runtime; env overrides CNI_* variables (None unsets one)."""
    variables: dict[str, str | None] = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee01",
        "CNI_NETNS": "/var/run/netns/cni-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": POD_ARGS,
        "CNI_PATH": "/opt/cni/bin",
        **env,
    }
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    environ.update({name: value for name, value in variables.items() if value is not None})
    stdin = config if isinstance(config, str) else json.dumps(config)
    started = time.monotonic()
    completed = subprocess.run(
        ARGV, input=stdin, env=environ, capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - started
    return PluginRun(completed.returncode, completed.stdout, completed.stderr, elapsed)


def expect_cni_error(run: PluginRun, code: int) -> dict[str, Any]:
    assert run.exit_code == 1, run.stderr
    error = run.output()
    assert error["code"] == code, error
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert error["msg"]
    return error


def add_request(**fields: Any) -> dict[str, Any]:
    """The request the agent should receive for the default pod, with fields replaced."""
    request = {
        "version": 1,
        "command": "ADD",
        "containerId": "c0ffee01",
        "netns": "/var/run/netns/cni-1",
        "ifName": "eth0",
        "args": POD_ARGS_PARSED,
        "ips": ["10.42.0.5", "fd00:42::5"],
        "gateways": ["10.42.0.1", "fd00:42::1"],
        "cniVersion": "1.0.0",
    }
    request.update(fields)
    return request


# ------------------------------------------------------------------ VERSION


def test_version_lists_every_spec_version_it_speaks() -> None:
    run = invoke("VERSION", {"cniVersion": "1.0.0"})

    assert run.exit_code == 0
    assert run.output() == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


# ------------------------------------------------------------------ ADD, agent up


def test_add_announces_the_pod_to_the_agent_and_passes_prev_result_through(
    run_dir: Path, start_agent: Any
) -> None:
    agent = start_agent(OK)

    run = invoke("ADD", pinion_config(run_dir))

    assert run.exit_code == 0, run.stderr
    assert run.output() == PREV_RESULT_1_0_0
    assert agent.requests == [add_request()]


@pytest.mark.parametrize(
    ("version", "prev_result", "ips", "gateways"),
    [
        ("0.4.0", PREV_RESULT_0_4_0, ["10.42.0.7"], ["10.42.0.1"]),
        ("0.3.1", PREV_RESULT_0_3_1, ["10.42.0.8", "10.42.0.9"], ["10.42.0.1"]),
    ],
    ids=["0.4.0", "0.3.1-shared-gateway"],
)
def test_add_understands_older_prev_result_formats(
    run_dir: Path,
    start_agent: Any,
    version: str,
    prev_result: dict[str, Any],
    ips: list[str],
    gateways: list[str],
) -> None:
    agent = start_agent(OK)

    run = invoke("ADD", pinion_config(run_dir, prev_result, cniVersion=version))

    assert run.exit_code == 0, run.stderr
    assert run.output() == prev_result
    assert agent.requests == [add_request(ips=ips, gateways=gateways, cniVersion=version)]


def test_agent_refusal_reaches_the_runtime_as_the_agents_own_error(
    run_dir: Path, start_agent: Any
) -> None:
    refusal = {"ok": False, "code": 104, "msg": "netns vanished", "details": "pod cart-7d9f"}
    start_agent(refusal)

    error = expect_cni_error(invoke("ADD", pinion_config(run_dir, failPolicy="open")), 104)

    assert (error["msg"], error["details"]) == ("netns vanished", "pod cart-7d9f")
    assert not (run_dir / "pending").exists()


def test_agent_hanging_up_without_a_reply_is_an_io_failure(run_dir: Path, start_agent: Any) -> None:
    start_agent(CLOSE_WITHOUT_REPLY)

    error = expect_cni_error(invoke("ADD", pinion_config(run_dir)), 5)

    assert "closed the connection without replying" in error["msg"]
    assert str(run_dir / "cni.sock") in error["msg"]


def test_agent_replying_garbage_is_an_io_failure(run_dir: Path, start_agent: Any) -> None:
    start_agent(b"not json at all\n")

    error = expect_cni_error(invoke("ADD", pinion_config(run_dir)), 5)

    assert "invalid reply" in error["msg"]


def test_silent_agent_fails_the_add_once_timeout_seconds_is_spent(
    run_dir: Path, start_agent: Any
) -> None:
    agent = start_agent(NEVER_ANSWER)

    run = invoke("ADD", pinion_config(run_dir, timeoutSeconds=0.5))

    error = expect_cni_error(run, 11)
    assert "no reply within 0.5s" in error["msg"]
    assert "failPolicy=closed" in error["msg"]
    assert run.seconds < 5
    assert len(agent.requests) == 1


# ------------------------------------------------------------------ DEL and CHECK, agent up


def test_del_tells_the_agent_and_prints_nothing(run_dir: Path, start_agent: Any) -> None:
    agent = start_agent(OK)

    run = invoke("DEL", pinion_config(run_dir, prev_result=None), CNI_NETNS=None)

    assert (run.exit_code, run.stdout) == (0, "")
    assert agent.requests == [add_request(command="DEL", netns="", ips=[], gateways=[])]


def test_check_asks_the_agent_and_prints_nothing(run_dir: Path, start_agent: Any) -> None:
    agent = start_agent(OK)

    run = invoke("CHECK", pinion_config(run_dir))

    assert (run.exit_code, run.stdout) == (0, "")
    assert agent.requests == [add_request(command="CHECK")]


# ------------------------------------------------------------------ agent down


def test_add_with_agent_down_and_fail_closed_asks_the_runtime_to_retry(run_dir: Path) -> None:
    error = expect_cni_error(invoke("ADD", pinion_config(run_dir)), 11)

    assert f"pinion agent not reachable at {run_dir / 'cni.sock'}" in error["msg"]
    assert "pod not started because failPolicy=closed" in error["msg"]
    assert not (run_dir / "pending").exists()


def test_add_with_agent_down_and_fail_open_starts_the_pod_and_leaves_a_pending_record(
    run_dir: Path,
) -> None:
    before = time.time()

    run = invoke("ADD", pinion_config(run_dir, failPolicy="open"))

    assert run.exit_code == 0, run.stderr
    assert run.output() == PREV_RESULT_1_0_0
    assert "failPolicy=open" in run.stderr
    pending_dir = run_dir / "pending"
    assert stat.S_IMODE(pending_dir.stat().st_mode) == 0o700
    assert [path.name for path in pending_dir.iterdir()] == ["c0ffee01.json"]
    record = json.loads((pending_dir / "c0ffee01.json").read_text())
    received_at = record.pop("receivedAt")
    assert before <= received_at <= time.time()
    assert record == add_request()


def test_del_with_agent_down_succeeds_and_forgets_the_pending_record(run_dir: Path) -> None:
    assert invoke("ADD", pinion_config(run_dir, failPolicy="open")).exit_code == 0

    run = invoke("DEL", pinion_config(run_dir, prev_result=None))

    assert (run.exit_code, run.stdout) == (0, "")
    assert not (run_dir / "pending" / "c0ffee01.json").exists()
    assert "removed its pending ADD record" in run.stderr


def test_del_with_agent_down_and_nothing_pending_still_succeeds(run_dir: Path) -> None:
    run = invoke("DEL", pinion_config(run_dir, prev_result=None), CNI_NETNS=None)

    assert (run.exit_code, run.stdout) == (0, "")


def test_check_with_agent_down_asks_the_runtime_to_retry(run_dir: Path) -> None:
    error = expect_cni_error(invoke("CHECK", pinion_config(run_dir, failPolicy="open")), 11)

    assert "not reachable" in error["msg"]


# ------------------------------------------------------------------ bad input, agent never asked


def test_malformed_config_json_is_a_decode_failure(run_dir: Path, start_agent: Any) -> None:
    agent = start_agent(OK)

    error = expect_cni_error(invoke("ADD", '{"cniVersion": "1.0.0", '), 6)

    assert error["cniVersion"] == "1.0.0"
    assert agent.requests == []


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("ADD", "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("CHECK", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
    ],
)
def test_missing_environment_variable_is_named_in_the_error(
    run_dir: Path, start_agent: Any, command: str, missing: str
) -> None:
    agent = start_agent(OK)

    error = expect_cni_error(invoke(command, pinion_config(run_dir), **{missing: None}), 4)

    assert missing in error["msg"]
    assert agent.requests == []


def test_unknown_command_is_an_environment_error(run_dir: Path) -> None:
    error = expect_cni_error(invoke("RESIZE", pinion_config(run_dir)), 4)

    assert "'RESIZE'" in error["msg"]


def test_unsupported_cni_version_is_refused(run_dir: Path) -> None:
    error = expect_cni_error(invoke("ADD", pinion_config(run_dir, cniVersion="0.2.0")), 1)

    assert "0.2.0" in error["msg"]
    assert "1.0.0" in error["details"]


def test_errors_speak_the_config_cni_version(run_dir: Path) -> None:
    config = pinion_config(run_dir, PREV_RESULT_0_4_0, cniVersion="0.4.0", failPolicy="maybe")

    assert expect_cni_error(invoke("ADD", config), 7)["cniVersion"] == "0.4.0"


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_add_or_check_without_prev_result_says_to_chain_after_a_real_plugin(
    run_dir: Path, command: str
) -> None:
    error = expect_cni_error(invoke(command, pinion_config(run_dir, prev_result=None)), 7)

    assert "prevResult" in error["msg"]
    assert "chained after" in error["msg"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("failPolicy", "sometimes"), ("type", "bridge"), ("timeoutSeconds", 0),
     ("timeoutSeconds", 1e19)],  # 1e19 once overflowed settimeout: reported as our own bug
)
def test_invalid_plugin_config_value_is_named_in_the_error(
    run_dir: Path, key: str, value: Any
) -> None:
    error = expect_cni_error(invoke("ADD", pinion_config(run_dir, **{key: value})), 7)

    assert key in error["msg"]
    assert repr(value) in error["msg"]


def test_a_config_nested_absurdly_deep_is_a_decode_error_not_our_bug(run_dir: Path) -> None:
    error = expect_cni_error(invoke("ADD", "[" * 100_000), 6)

    assert "nested too deeply" in error["msg"]


def test_cni_args_too_long_for_the_agent_are_refused_before_sending(run_dir: Path) -> None:
    run = invoke("ADD", pinion_config(run_dir), CNI_ARGS=POD_ARGS + ";PINION_PAD=" + "x" * 70_000)

    error = expect_cni_error(run, 4)
    assert "over its 64 KiB" in error["msg"]


@pytest.mark.parametrize(("over", "accepted"), [(0, True), (1, False)])
def test_the_64_kib_request_limit_counts_the_same_bytes_in_both_implementations(
    run_dir: Path, start_agent: Any, over: int, accepted: bool
) -> None:
    """The agent reads 64 KiB of one request line: a request of exactly that is sent, one
    byte more is refused before sending. Both plugins format the request as json.dumps does."""
    agent = start_agent(OK)
    request = add_request(args={**POD_ARGS_PARSED, "PINION_PAD": ""})
    xs = 64 * 1024 - len(json.dumps(request).encode() + b"\n") - len("\\u00e9") + over
    cni_args = POD_ARGS + ";PINION_PAD=" + "x" * xs + "é"  # é: sent as \u00e9, 6 bytes

    run = invoke("ADD", pinion_config(run_dir), CNI_ARGS=cni_args)

    if accepted:
        assert run.exit_code == 0, run.stdout
        assert len(agent.requests) == 1
    else:
        assert "is 65537 bytes, over its 64 KiB" in expect_cni_error(run, 4)["msg"]
        assert agent.requests == []


def test_malformed_cni_args_pair_is_an_environment_error(run_dir: Path) -> None:
    run = invoke("ADD", pinion_config(run_dir), CNI_ARGS="K8S_POD_NAME=cart;garbage")

    error = expect_cni_error(run, 4)
    assert "'garbage'" in error["msg"]


@pytest.mark.parametrize("container_id", ["../../etc/passwd", ".hidden", "a/b", "id with space"])
def test_container_id_unfit_for_a_file_name_is_refused(run_dir: Path, container_id: str) -> None:
    config = pinion_config(run_dir, failPolicy="open")

    error = expect_cni_error(invoke("ADD", config, CNI_CONTAINERID=container_id), 4)

    assert "CNI_CONTAINERID" in error["msg"]
    assert not (run_dir / "pending").exists()

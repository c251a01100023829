"""Per-pod certificates over time: issued once, renewed at half-life (new handshakes get the new
certificate, the previous one is kept until it expires), signer failures retried with backoff.

Time is a FakeTime shared by the manager and a real LocalSigner: the renewal loop's sleeps are
held until the test lets them end, so every renewal happens at a known instant."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.identity.authority import Issued, IssueError, LocalSigner
from agent.identity.credentials import Credentials
from agent.identity.crypto import cert_info, generate_key, make_csr
from agent.identity.files import init_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityManager
from agent.identity.tls import AES_FIRST
from tests.unit.test_identity_tls import handshake

T0 = 1_800_000_000.0
CART = SpiffeId("cluster.local", "shop", "cart")
WEB = SpiffeId("cluster.local", "shop", "web")


class FakeTime:
    """A clock, and a sleep that lasts until the test calls elapse()."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self._wakeup: asyncio.Future[None] | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def next_sleep(self) -> float:
        """Wait until the code under test sleeps; how long it asked for."""
        for _ in range(1000):
            if self._wakeup is not None and not self._wakeup.done():
                return self.sleeps[-1]
            await asyncio.sleep(0)
        raise AssertionError("the renewal loop never went to sleep")

    async def elapse(self) -> float:
        """Let the pending sleep run to its end; returns its length."""
        seconds = await self.next_sleep()
        self.now += seconds
        assert self._wakeup is not None
        self._wakeup.set_result(None)
        return seconds


class FlakySigner:
    """A LocalSigner that fails the first `failures` requests (or all, with None)."""

    def __init__(self, signer: LocalSigner, failures: int | None) -> None:
        self._signer, self.failures, self.calls = signer, failures, 0

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise IssueError("issuer unreachable")
        return await self._signer.sign(csr_pem, identity, lifetime)


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity")
    init_identity_dir(path, clock=lambda: T0 - 3600)
    return path


def manager_for(identity_dir: Path, time: FakeTime, lifetime: float, failures: int | None = 0,
                changes: list[tuple[str, Credentials]] | None = None) -> IdentityManager:
    signer = FlakySigner(LocalSigner.from_dir(identity_dir, clock=time), failures)
    bundle = (identity_dir / "trust-bundle.crt").read_bytes()
    return IdentityManager(signer, bundle, "cluster.local", AES_FIRST, lifetime=lifetime, clock=time,
                           on_change=(lambda pod, credentials: changes.append((pod, credentials)))
                           if changes is not None else None,
                           sleep=time.sleep, jitter=lambda: 0.5)  # 0.5: the retry delays are exact


def run_with_loop(manager: IdentityManager, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` while the renewal loop runs; the loop must still be running at the end."""
    async def main() -> None:
        loop_task = asyncio.create_task(manager.run())
        try:
            await body()
            assert not loop_task.done(), "the renewal loop stopped"
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    asyncio.run(main())


def test_a_two_second_certificate_is_renewed_at_half_life(identity_dir: Path) -> None:
    time = FakeTime(T0 + 0.5)
    changes: list[tuple[str, Credentials]] = []
    manager = manager_for(identity_dir, time, lifetime=2.0, changes=changes)

    async def body() -> None:
        first = await manager.ensure("shop/cart-1", CART)
        # Backdated by a tenth of its lifetime; whole seconds, rounded outwards.
        assert (first.not_before, first.not_after) == (T0, T0 + 3)
        server_context = manager.server_context("shop/cart-1")

        assert await time.elapse() == 1.0  # the renewal comes 1 s after the issue...
        assert time.now == first.renew_at  # ...at half-life
        await time.next_sleep()
        entry = manager.get("shop/cart-1")
        assert entry is not None and manager.renewals == 1
        assert entry.previous is first and entry.current is not first
        assert entry.current.not_after > first.not_after
        assert cert_info(entry.current.chain_pem).serial != cert_info(first.chain_pem).serial
        assert manager.server_context("shop/cart-1") is not server_context  # new handshakes, new cert
        assert changes == [("shop/cart-1", first), ("shop/cart-1", entry.current)]

        while time.now < first.not_after:
            await time.elapse()
        await time.next_sleep()
        assert entry.previous is not first  # kept only until it expired
        assert manager.renewal_failures == 0

    run_with_loop(manager, body)


def test_a_failing_signer_is_retried_with_backoff_until_it_recovers(identity_dir: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=120.0)

    async def body() -> None:
        first = await manager.ensure("shop/cart-1", CART)  # the signer works for the first certificate...
        signer = manager._signer
        assert isinstance(signer, FlakySigner)
        signer.failures, signer.calls = 3, 0  # ...then fails three times
        for _ in range(4):
            await time.elapse()
        await time.next_sleep()
        entry = manager.get("shop/cart-1")
        assert entry is not None
        assert time.sleeps[:4] == [first.renew_at - T0, 1.0, 2.0, 4.0]
        assert (manager.renewal_failures, manager.renewals) == (3, 1)
        assert entry.previous is first and entry.failures == 0
        assert time.sleeps[4] == entry.current.renew_at - time.now  # back to the half-life rhythm

    with caplog.at_level(logging.WARNING, logger="agent.identity.store"):
        run_with_loop(manager, body)
    failures = [record.getMessage() for record in caplog.records]
    assert len(failures) == 3
    assert failures[0] == ("identity: renewing shop/cart-1 (spiffe://cluster.local/ns/shop/sa/cart) failed "
                           "(issuer unreachable); retry in 1.0s, its certificate is valid for 66s more")


def test_backoff_stops_growing_at_a_minute_and_the_old_certificate_stays(identity_dir: Path) -> None:
    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=120.0)

    async def body() -> None:
        first = await manager.ensure("shop/cart-1", CART)
        signer = manager._signer
        assert isinstance(signer, FlakySigner)
        signer.failures = None
        for _ in range(10):
            await time.elapse()
        assert time.sleeps[1:10] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
        assert manager.renewal_failures == 9 and manager.renewals == 0
        entry = manager.get("shop/cart-1")
        assert entry is not None and entry.current is first  # nothing better to present

    run_with_loop(manager, body)


def test_an_issuer_that_says_retry_after_is_not_asked_sooner(identity_dir: Path) -> None:
    from agent.identity.remote import IssuerRefused

    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=120.0)

    async def body() -> None:
        await manager.ensure("shop/cart-1", CART)
        signer = manager._signer
        assert isinstance(signer, FlakySigner)

        async def busy(csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
            raise IssuerRefused(429, "rate_limited", "slow down", retry_after=100.0)

        signer.sign = busy  # type: ignore[method-assign]
        for _ in range(3):
            await time.elapse()
        assert time.sleeps[1:3] == [100.0, 100.0]  # not 1 s, then 2 s

    run_with_loop(manager, body)


def test_retry_delays_are_jittered(identity_dir: Path) -> None:
    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=120.0, failures=None)
    manager._jitter = iter([0.0, 0.999]).__next__

    async def body() -> None:
        signer = manager._signer
        assert isinstance(signer, FlakySigner)
        signer.failures = 0
        await manager.ensure("shop/cart-1", CART)
        signer.failures, signer.calls = None, 0
        for _ in range(3):
            await time.elapse()
        assert time.sleeps[1] == pytest.approx(0.8)
        assert time.sleeps[2] == pytest.approx(2 * 1.2, abs=0.01)

    run_with_loop(manager, body)


def test_a_pod_added_while_the_loop_idles_gets_renewed(identity_dir: Path) -> None:
    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=2.0)

    async def body() -> None:
        for _ in range(20):
            await asyncio.sleep(0)  # the loop has nothing to renew: it waits, without sleeping
        assert time.sleeps == []
        credentials = await manager.ensure("shop/web-1", WEB)
        assert await time.next_sleep() == credentials.renew_at - T0

    run_with_loop(manager, body)


def test_ensure_issues_once_for_concurrent_callers(identity_dir: Path) -> None:
    manager = manager_for(identity_dir, FakeTime(T0), lifetime=3600.0)

    async def body() -> None:
        first, second = await asyncio.gather(manager.ensure("shop/cart-1", CART),
                                             manager.ensure("shop/cart-1", CART))
        assert first is second and manager.issued == 1
        assert await manager.ensure("shop/cart-1", CART) is first

    asyncio.run(body())


def test_a_new_identity_for_the_same_pod_key_replaces_the_old(identity_dir: Path) -> None:
    manager = manager_for(identity_dir, FakeTime(T0), lifetime=3600.0)

    async def body() -> None:
        await manager.ensure("shop/pod", CART)
        web = await manager.ensure("shop/pod", WEB)
        entry = manager.get("shop/pod")
        assert entry is not None and entry.current is web and entry.previous is None
        assert manager.expiry() == {str(WEB): web.not_after}

    asyncio.run(body())


def test_ensure_refuses_a_foreign_trust_domain(identity_dir: Path) -> None:
    manager = manager_for(identity_dir, FakeTime(T0), lifetime=3600.0)

    with pytest.raises(IssueError, match="outside the mesh's trust domain"):
        asyncio.run(manager.ensure("shop/x", SpiffeId("other.org", "shop", "x")))
    assert manager.issued == 0


def test_a_signer_that_returns_someone_elses_certificate_is_not_trusted(identity_dir: Path) -> None:
    class Swapping:
        """Signs a CSR of its own, not ours: the certificate holds a key we do not have."""

        async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
            signer = LocalSigner.from_dir(identity_dir, clock=lambda: T0)
            return signer.sign_now(make_csr(generate_key(), str(identity)), identity, lifetime)

    bundle = (identity_dir / "trust-bundle.crt").read_bytes()
    manager = IdentityManager(Swapping(), bundle, "cluster.local", AES_FIRST, clock=lambda: T0)

    with pytest.raises(IssueError, match="another key"):
        asyncio.run(manager.ensure("shop/cart-1", CART))
    assert manager.get("shop/cart-1") is None


def test_forget_drops_a_pod_and_expiry_reports_the_soonest_per_identity(identity_dir: Path) -> None:
    time = FakeTime(T0)
    manager = manager_for(identity_dir, time, lifetime=3600.0)

    async def body() -> None:
        early = await manager.ensure("shop/cart-1", CART)
        time.now += 10
        later = await manager.ensure("shop/cart-2", CART)
        web = await manager.ensure("shop/web-1", WEB)
        assert later.not_after == early.not_after + 10
        assert manager.expiry() == {str(CART): early.not_after, str(WEB): web.not_after}
        manager.forget("shop/cart-1")
        assert manager.expiry() == {str(CART): later.not_after, str(WEB): web.not_after}
        with pytest.raises(KeyError, match="shop/cart-1"):
            manager.server_context("shop/cart-1")

    asyncio.run(body())


def test_a_new_trust_bundle_reaches_new_handshakes(tmp_path: Path) -> None:
    """Anchor rotation: once the bundle holds the new anchor too, its certificates are accepted."""
    init_identity_dir(tmp_path / "old")  # real time here: these certificates meet a real handshake
    init_identity_dir(tmp_path / "new")
    new_anchor = (tmp_path / "new" / "trust-bundle.crt").read_bytes()
    old_bundle = (tmp_path / "old" / "trust-bundle.crt").read_bytes()
    ours = IdentityManager(LocalSigner.from_dir(tmp_path / "old"), old_bundle, "cluster.local", AES_FIRST)
    theirs = IdentityManager(LocalSigner.from_dir(tmp_path / "new"), new_anchor + old_bundle, "cluster.local",
                             AES_FIRST)
    asyncio.run(ours.ensure("shop/web-1", WEB))
    asyncio.run(theirs.ensure("shop/cart-1", CART))
    before = ours.server_context("shop/web-1")

    assert handshake(before, theirs.client_context("shop/cart-1"))[0].error is not None
    ours.reload_bundle(old_bundle + new_anchor)
    server, _ = handshake(ours.server_context("shop/web-1"), theirs.client_context("shop/cart-1"))

    assert ours.server_context("shop/web-1") is not before
    assert server.error is None and server.peer == CART
    with pytest.raises(ValueError, match="no PEM certificate"):
        ours.reload_bundle(b"")

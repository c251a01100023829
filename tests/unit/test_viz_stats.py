"""The arithmetic behind `pinion stat/top`: Prometheus' histogram_quantile, counter deltas over a
window, golden metrics per pod, and grouping pods into Deployments by name."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from agent.viz.resources import Resource, Selection, owners_of, stat_rows
from agent.viz.scrape import parse_metrics
from agent.viz.stats import (
    Golden,
    PodKey,
    Sample,
    counter_delta,
    golden_by,
    histogram_quantile,
    owner_name,
    pod_direction,
    window_deltas,
)

INF = math.inf
LINKERD_BOUNDS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000,
                  4000, 5000, 10000, 20000, 30000, 40000, 50000)


# --- canned Linkerd-schema metrics text (also used by test_viz_commands) ---------------------

def _labels(values: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in values.items()) + "}"


def pod_series(namespace: str, pod: str, direction: str = "inbound", *, ok: int = 0,
               failed: int = 0, latencies: Mapping[float, int] | None = None, tcp_open: int = 0,
               tls: str = "true", extra: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """One pod+direction's series, family -> lines; `latencies` maps an observed ms to a count."""
    base = {"direction": direction, "namespace": namespace, "pod": pod, "tls": tls, **(extra or {})}
    observed = latencies or {}
    bucket_lines = [f"response_latency_ms_bucket{_labels({**base, 'le': str(float(bound))})} "
                    f"{sum(n for ms, n in observed.items() if ms <= bound)}" for bound in LINKERD_BOUNDS]
    bucket_lines.append(f"response_latency_ms_bucket{_labels({**base, 'le': '+Inf'})} "
                        f"{sum(observed.values())}")
    success = {**base, "classification": "success", "status_code": "200", "grpc_status": ""}
    failure = {**base, "classification": "failure", "status_code": "500", "grpc_status": ""}
    latency_sum = sum(ms * n for ms, n in observed.items())
    return {
        "request_total counter": [f"request_total{_labels(base)} {ok + failed}"],
        "response_total counter": [f"response_total{_labels(success)} {ok}",
                                   f"response_total{_labels(failure)} {failed}"],
        "response_latency_ms histogram": [
            *bucket_lines, f"response_latency_ms_sum{_labels(base)} {latency_sum}",
            f"response_latency_ms_count{_labels(base)} {sum(observed.values())}"],
        "tcp_open_connections gauge": [
            f"tcp_open_connections{_labels({**base, 'peer': 'src'})} {tcp_open}"],
    }


def metrics_text(*series: dict[str, list[str]], start_time: float = 1_700_000_000.0,
                 meshed: int = 1) -> str:
    families: dict[str, list[str]] = {}
    for one in series:
        for family, lines in one.items():
            families.setdefault(family, []).extend(lines)
    text = "".join(f"# TYPE {family}\n" + "".join(f"{line}\n" for line in lines)
                   for family, lines in families.items())
    return (text + f"# TYPE pinion_meshed_pods gauge\npinion_meshed_pods {meshed}\n"
            f"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start_time}\n")


# The known mix: 50 requests before the window, then 90 x 200 and 10 x 500 inside it; latencies
# inside the window: 20 at 5 ms, 40 at 10 ms, 30 at 50 ms, 10 at 100 ms.
BEFORE = metrics_text(pod_series("default", "web-7d4b9c8f6d-x2x9q", ok=45, failed=5,
                                 latencies={5: 50}, tcp_open=1))
AFTER = metrics_text(pod_series("default", "web-7d4b9c8f6d-x2x9q", ok=135, failed=15,
                                latencies={5: 70, 10: 40, 50: 30, 100: 10}, tcp_open=3))
WINDOW_P50, WINDOW_P95, WINDOW_P99 = 8.75, 75.0, 95.0
PODS = Selection(Resource("pod"), None)
inbound_pod = PODS.key  # `pinion stat pods -A`: each pod's inbound side


# --- histogram_quantile ------------------------------------------------------------------------

def _cumulative(bounds_counts: Mapping[float, int]) -> list[tuple[float, float]]:
    return [(float(b), float(c)) for b, c in bounds_counts.items()]


HAND = _cumulative({5: 20, 10: 60, 50: 90, 100: 100, INF: 100})


@pytest.mark.parametrize(("q", "expected"), [
    (0.5, 8.75),     # rank 50 in (5, 10]: 5 + 5 * (50 - 20) / 40
    (0.95, 75.0),    # rank 95 in (50, 100]: 50 + 50 * 5 / 10
    (0.99, 95.0),
    (0.1, 2.5),      # first bucket interpolates from 0: 5 * 10 / 20
    (1.0, 100.0),    # rank 100 is reached at le=100, not in +Inf
    (0.0, 0.0),
])
def test_quantile_interpolates_linearly_inside_the_bucket(q: float, expected: float) -> None:
    assert histogram_quantile(q, HAND) == pytest.approx(expected)


def test_rank_in_the_inf_bucket_gives_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.9, [(1, 1), (2, 2), (INF, 10)]) == 2
    assert histogram_quantile(0.5, [(1, 0), (2, 0), (INF, 5)]) == 2


@pytest.mark.parametrize("buckets", [
    [],                                   # nothing scraped
    [(1, 0), (2, 0), (INF, 0)],           # no observations in the window
    [(1, 1), (2, 2)],                     # no +Inf bucket
    [(INF, 5)],                           # fewer than two buckets
])
def test_undefined_quantiles_are_nan(buckets: list[tuple[float, float]]) -> None:
    assert math.isnan(histogram_quantile(0.5, buckets))


def test_q_outside_zero_to_one() -> None:
    assert histogram_quantile(-0.1, HAND) == -INF
    assert histogram_quantile(1.1, HAND) == INF
    assert math.isnan(histogram_quantile(math.nan, HAND))


def test_lowest_bucket_at_or_below_zero_returns_its_bound() -> None:
    assert histogram_quantile(0.25, [(-1, 5), (0, 10), (INF, 10)]) == -1


def test_q_zero_with_an_empty_first_bucket_is_nan_as_in_prometheus() -> None:
    assert math.isnan(histogram_quantile(0.0, [(1, 0), (2, 4), (INF, 4)]))


def test_buckets_are_sorted_and_equal_bounds_coalesced() -> None:
    assert histogram_quantile(0.5, [(INF, 4), (2, 3), (1, 1), (2, 1)]) == pytest.approx(1 + 1 / 3)


def test_non_monotonic_counts_are_forced_monotonic() -> None:
    assert histogram_quantile(0.5, [(1, 5), (2, 3), (INF, 6)]) == pytest.approx(0.6)


# --- window -----------------------------------------------------------------------------------

def test_counter_delta_treats_a_drop_as_a_reset() -> None:
    assert counter_delta(10, 25) == 15
    assert counter_delta(30, 4) == 4
    assert counter_delta(None, 7) == 7


def test_window_deltas_count_series_born_inside_the_window_whole_and_skip_gauges() -> None:
    before = parse_metrics(BEFORE)
    after = parse_metrics(AFTER) + parse_metrics(metrics_text(pod_series("default", "new", ok=3)))
    deltas = {(s.name, s.labels["pod"], s.labels.get("classification")): s.value
              for s in window_deltas(before, after) if "le" not in s.labels}
    assert deltas[("request_total", "web-7d4b9c8f6d-x2x9q", None)] == 100
    assert deltas[("response_total", "web-7d4b9c8f6d-x2x9q", "success")] == 90
    assert deltas[("response_total", "new", "success")] == 3
    assert not any(name == "tcp_open_connections" for name, _, _ in deltas)


def _stat_of_known_mix(window: float) -> Golden:
    before, after = parse_metrics(BEFORE), parse_metrics(AFTER)
    return golden_by(window_deltas(before, after), after, window, inbound_pod)[
        PodKey("default", "web-7d4b9c8f6d-x2x9q")]


def test_golden_metrics_of_the_known_mix() -> None:
    golden = _stat_of_known_mix(window=4.0)
    assert golden.success_rate == pytest.approx(0.90)
    assert golden.rps == pytest.approx(100 / 4.0)
    assert golden.latency_ms(0.5) == pytest.approx(WINDOW_P50)
    assert golden.latency_ms(0.95) == pytest.approx(WINDOW_P95)
    assert golden.latency_ms(0.99) == pytest.approx(WINDOW_P99)
    assert golden.tcp_open_connections == 3


def test_stat_counts_only_the_inbound_side() -> None:
    text = metrics_text(pod_series("default", "client", "outbound", ok=10))
    golden = golden_by(window_deltas([], parse_metrics(text)), [], 1.0, inbound_pod)
    assert golden == {}
    by_direction = golden_by(window_deltas([], parse_metrics(text)), [], 1.0, pod_direction)
    assert by_direction[("default", "client", "outbound")].rps == 10


def test_a_quiet_window_has_no_success_rate_or_latency() -> None:
    golden = golden_by(window_deltas(parse_metrics(BEFORE), parse_metrics(BEFORE)), [], 1.0,
                       inbound_pod)[PodKey("default", "web-7d4b9c8f6d-x2x9q")]
    assert (golden.rps, golden.success_rate, golden.latency_ms(0.5)) == (0.0, None, None)


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        golden_by([], [], 0.0, inbound_pod)


# --- deployments -------------------------------------------------------------------------------

@pytest.mark.parametrize(("pod", "owner"), [
    ("web-7d4b9c8f6d-x2x9q", "web"),
    ("my-app-v2-6c9f8b7d54-q7w2z", "my-app-v2"),
    ("db-0", "db-0"),                         # StatefulSet: stands alone
    ("fluent-bit-x7k2p", "fluent-bit-x7k2p"),  # DaemonSet shape: stands alone
    ("web-abcdefgh-x2x9q", "web-abcdefgh-x2x9q"),  # vowels never appear in a template hash
    ("web-7d4b9c8f6d-x2x9", "web-7d4b9c8f6d-x2x9"),
])
def test_owner_name_from_the_pod_name(pod: str, owner: str) -> None:
    assert owner_name(pod) == owner


def test_deployments_group_pods_and_add_their_traffic() -> None:
    web_a, web_b = PodKey("default", "web-7d4b9c8f6d-x2x9q"), PodKey("default", "web-7d4b9c8f6d-k8m4t")
    golden = {web_a: Golden(rps=3.0, successes=9, responses=10, buckets={10.0: 10, INF: 10}, observed=True),
              web_b: Golden(rps=1.0, successes=1, responses=2, buckets={10.0: 2, INF: 2}, observed=True)}
    deployments = Selection(Resource("deployment"), "default")
    rows = stat_rows(deployments, golden, meshed={web_a, PodKey("other", "db-0")}, seen={web_b},
                     owners={}, guess=owner_name)
    assert [(r.name, r.meshed, r.total) for r in rows] == [("web", 1, 2)]
    assert rows[0].golden is not None and rows[0].golden.rps == 4.0
    assert rows[0].golden.success_rate == pytest.approx(10 / 12)
    assert rows[0].golden.buckets == {10.0: 12, INF: 12}
    all_rows = stat_rows(PODS, golden, {web_a, PodKey("other", "db-0")}, {web_b}, {}, owner_name)
    assert [(r.namespace, r.name, r.running) for r in all_rows] == [
        ("default", "web-7d4b9c8f6d-k8m4t", False), ("default", "web-7d4b9c8f6d-x2x9q", True),
        ("other", "db-0", True)]


def test_known_owners_beat_the_guess_and_a_job_pod_is_no_deployment() -> None:
    """Kubernetes mode: the agents know the owner (a pod named like no Deployment's, a
    Deployment whose name ends like a hash, a Job's pod whose name looks like a Deployment's)."""
    odd, api = PodKey("shop", "frontend-blue"), PodKey("shop", "api-v2-5d8f9c7b6-abcde")
    job = PodKey("shop", "backup-5d8f9c7b6-abcde")
    samples = [Sample("request_total", {"namespace": "shop", "pod": "frontend-blue", "deployment": "frontend",
                                        "direction": "inbound"}, 3.0),
               Sample("request_total", {"namespace": "shop", "pod": job.name, "k8s_job": "backup",
                                        "direction": "inbound"}, 3.0)]
    entries = [{"namespace": "shop", "name": api.name, "owner": {"kind": "deployment", "name": "api-v2"}},
               {"namespace": "shop", "name": "db-0", "owner": {"kind": "statefulset", "name": "db"}}]
    owners = owners_of(samples, entries)
    pods = {odd, api, job, PodKey("shop", "db-0")}

    def names(kind: str) -> list[str]:
        selection = Selection(Resource(kind), "shop")
        return [r.name for r in stat_rows(selection, {}, pods, set(), owners, owner_name)]

    assert owners[odd] == ("deployment", "frontend") and owners[job] == ("job", "backup")
    assert names("deployment") == ["api-v2", "frontend"]
    assert (names("job"), names("statefulset"), names("daemonset")) == (["backup"], ["db"], [])
    assert names("namespace") == ["shop"]


def _outbound(pod: str, deployment: str, **labels: str) -> Sample:
    return Sample("response_total", {"direction": "outbound", "namespace": "shop", "pod": pod,
                                     "deployment": deployment, "classification": "success", **labels}, 4.0)


def test_to_and_from_select_the_outbound_series_between_two_resources() -> None:
    """linkerd viz stat deploy --to deploy/api: the clients' outbound series naming api;
    --from deploy/web: web's outbound series, one row per destination."""
    samples = [_outbound("web-1", "web", dst_deployment="api", dst_namespace="shop"),
               _outbound("web-1", "web", dst_statefulset="db", dst_namespace="shop"),
               _outbound("cron-1", "cron", dst_deployment="api", dst_namespace="shop"),
               Sample("response_total", {"direction": "inbound", "namespace": "shop", "pod": "api-1",
                                         "deployment": "api", "classification": "success"}, 8.0)]
    to_api = Selection(Resource("deployment"), "shop", to=Resource("deployment", "api"))
    from_web = Selection(Resource("statefulset"), "shop", from_=Resource("deployment", "web"))
    services = Selection(Resource("service"), "shop")

    assert {to_api.key(s) for s in samples} == {PodKey("shop", "web-1"), PodKey("shop", "cron-1"), None}
    assert [from_web.key(s) for s in samples] == [None, PodKey("shop", "db"), None, None]
    assert {services.key(s) for s in samples} == {None}
    with pytest.raises(ValueError, match="together"):
        Selection(Resource("pod"), "shop", to=Resource("deployment", "a"), from_=Resource("deployment", "b"))

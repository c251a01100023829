"""Prometheus metric families, a registry and the text exposition, for the agent's processes.

What the agent needs of `prometheus_client`, written small: importing that package pulls in
http.server, wsgiref, email, urllib.request, gzip and their kin (~3 MiB of RSS in every
agent, issuer and gateway, measured in docs/benchmarks.md) for an HTTP server we do not run.
The bytes a scrape gets are the same as `prometheus_client.generate_latest` renders for the
same families (tests/unit/test_exposition.py compares both): the text format 0.0.4 (served,
as prometheus_client 0.26 serves it, as `text/plain; version=1.0.0`: identical for names in
the legacy character set, the only ones allowed here), HELP and TYPE per family, a counter's
family named without `_total` and its samples with it, labels sorted, values as Go prints
floats. No `_created` series (prometheus_client's `disable_created_metrics()`, which every
Pinion process called). The CLI's readers (agent/viz) still parse with prometheus_client.

Counters and gauges here have no locks: every Pinion process updates them from its event
loop's thread.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

CONTENT_TYPE_LATEST = "text/plain; version=1.0.0; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class Sample(NamedTuple):
    name: str
    labels: Mapping[str, str]
    value: float


class Metric:
    """One metric family: its name, help, type and samples (as prometheus_client's Metric)."""

    __slots__ = ("documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.samples: list[Sample] = []

    def add_sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self.samples.append(Sample(name, labels, value))


class _Family(Metric):
    __slots__ = ("_labelnames", "_suffix")

    def __init__(self, name: str, documentation: str, typ: str, suffix: str,
                 value: float | None, labels: Sequence[str] | None) -> None:
        super().__init__(name, documentation, typ)
        for label in labels or ():
            _check_label(label)
        self._labelnames = tuple(labels or ())
        self._suffix = suffix
        if value is not None:
            if self._labelnames:
                raise ValueError("a family with labels takes values by add_metric")
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self.name}: {len(self._labelnames)} label values expected, "
                             f"not {len(labels)}")
        self.add_sample(self.name + self._suffix, dict(zip(self._labelnames, labels, strict=True)), value)


class CounterMetricFamily(_Family):
    """A counter rendered at collect time; its samples are `<name>_total`."""

    __slots__ = ()

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter", "_total",
                         value, labels)


class GaugeMetricFamily(_Family):
    __slots__ = ()

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "gauge", "", value, labels)


class HistogramMetricFamily(Metric):
    """A histogram whose _bucket, _count and _sum samples the caller adds."""

    __slots__ = ()

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "histogram")


class Collector:
    """Something a registry asks for families at every scrape."""

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError


class CollectorRegistry(Collector):
    """Collectors in the order they were registered; a scrape collects them in that order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()

    def register(self, collector: Collector) -> None:
        name = collector.name if isinstance(collector, _Wrapper) else None
        if name is not None:
            if name in self._names:
                raise ValueError(f"duplicated metric {name!r}")
            self._names.add(name)
        self._collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        self._collectors.remove(collector)
        if isinstance(collector, _Wrapper):
            self._names.discard(collector.name)

    def collect(self) -> Iterator[Metric]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The value of one sample, None if there is none (as prometheus_client's)."""
        wanted = dict(labels or {})
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return sample.value
        return None


class _Value:
    __slots__ = ("function", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def get(self) -> float:
        return self.value if self.function is None else float(self.function())


class _Wrapper(Collector):
    """A Counter or Gauge: one value, or one per combination of label values (children,
    rendered in the order they were first asked for)."""

    _type = ""
    _suffix = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        if self._suffix:
            name = name.removesuffix(self._suffix)
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            _check_label(label)
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Value] = {}
        self._value = _Value()
        if registry is not None:
            registry.register(self)

    def _child(self, values: Sequence[object], named: Mapping[str, object]) -> _Value:
        if not self._labelnames:
            raise ValueError(f"{self.name} has no labels")
        if values and named:
            raise ValueError("label values by position or by name, not both")
        if named:
            if set(named) != set(self._labelnames):
                raise ValueError(f"{self.name}: labels {self._labelnames} expected")
            values = [named[label] for label in self._labelnames]
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: {len(self._labelnames)} label values expected")
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _Value()
        return child

    def _own(self) -> _Value:
        if self._labelnames:
            raise ValueError(f"{self.name} has labels: call labels() first")
        return self._value

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, self._type)
        sample = self.name + self._suffix
        if self._labelnames:
            for key, child in list(self._children.items()):
                family.add_sample(sample, dict(zip(self._labelnames, key, strict=True)), child.get())
        else:
            family.add_sample(sample, {}, self._value.get())
        yield family


class _CounterChild:
    __slots__ = ("_value",)

    def __init__(self, value: _Value) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._value.value += amount


class Counter(_Wrapper):
    _type = "counter"
    _suffix = "_total"

    def labels(self, *values: object, **named: object) -> _CounterChild:
        return _CounterChild(self._child(values, named))

    def inc(self, amount: float = 1) -> None:
        _CounterChild(self._own()).inc(amount)


class _GaugeChild:
    __slots__ = ("_value",)

    def __init__(self, value: _Value) -> None:
        self._value = value

    def set(self, value: float) -> None:
        self._value.value = float(value)

    def inc(self, amount: float = 1) -> None:
        self._value.value += amount

    def dec(self, amount: float = 1) -> None:
        self._value.value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """The value is `function()` at each scrape from now on."""
        self._value.function = function


class Gauge(_Wrapper):
    _type = "gauge"

    def labels(self, *values: object, **named: object) -> _GaugeChild:
        return _GaugeChild(self._child(values, named))

    def set(self, value: float) -> None:
        _GaugeChild(self._own()).set(value)

    def inc(self, amount: float = 1) -> None:
        _GaugeChild(self._own()).inc(amount)

    def dec(self, amount: float = 1) -> None:
        _GaugeChild(self._own()).dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        _GaugeChild(self._own()).set_function(function)


class ProcessCollector(Collector):
    """process_* of this process, from /proc/self as prometheus_client's ProcessCollector
    reads them: virtual and resident memory, start time, CPU seconds, open and max fds."""

    def __init__(self, registry: CollectorRegistry | None = None, proc: str = "/proc") -> None:
        self._proc = proc
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._page = float(os.sysconf("SC_PAGE_SIZE"))
        self._boot = 0.0
        try:
            with open(os.path.join(proc, "stat"), "rb") as stat:
                for line in stat:
                    if line.startswith(b"btime "):
                        self._boot = float(line.split()[1])
        except OSError:
            pass
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        if not self._boot:
            return
        own = os.path.join(self._proc, "self")
        try:
            with open(os.path.join(own, "stat"), "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
        except OSError:
            parts = []
        if parts:
            yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                    value=float(parts[20]))
            yield GaugeMetricFamily("process_resident_memory_bytes",
                                    "Resident memory size in bytes.",
                                    value=float(parts[21]) * self._page)
            yield GaugeMetricFamily("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds.",
                                    value=float(parts[19]) / self._ticks + self._boot)
            yield CounterMetricFamily("process_cpu_seconds",
                                      "Total user and system CPU time spent in seconds.",
                                      value=(float(parts[11]) + float(parts[12])) / self._ticks)
        try:
            max_fds = None
            with open(os.path.join(own, "limits"), "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open file"):
                        max_fds = float(line.split()[3])
                        break
            open_fds = len(os.listdir(os.path.join(own, "fd")))
        except OSError:
            return
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                                value=open_fds)
        if max_fds is not None:
            yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                                    value=max_fds)


def generate_latest(registry: Collector) -> bytes:
    """The text exposition of everything `registry` collects now."""
    out: list[str] = []
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {documentation}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                pairs = ",".join(f'{key}="{_escape(value)}"'
                                 for key, value in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{pairs}}} {go_float(sample.value)}\n")
            else:
                out.append(f"{sample.name} {go_float(sample.value)}\n")
    return "".join(out).encode()


def go_float(value: float) -> str:
    """A float as Go's strconv prints it in the exposition (as prometheus_client does)."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _check_label(label: str) -> None:
    if not _LABEL.match(label) or label.startswith("__"):
        raise ValueError(f"invalid label name {label!r}")

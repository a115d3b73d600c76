"""``/metrics``: the index's counters and histograms in Prometheus' text format.

Counters and histograms come from `Index.metric_values` (every process counts into the
index, see `dicom_ai.metrics`); gauges are measured at scrape time: the jobs waiting for a
worker, the free bytes on the spool's file system, and the bytes the spool holds. Every
metric `dicom_ai.metrics` names is always exposed, with its HELP and TYPE, also before
anything was counted. Labels carry model ids, stage names, destination names and fixed
results; never AE titles, addresses or patient data.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dicom_ai import metrics
from dicom_ai.store.index import Index, MetricValues

__all__ = ["CONTENT_TYPE", "QUEUE_DEPTH", "SPOOL_BYTES", "SPOOL_FREE_BYTES", "render"]

# What generate_latest writes (prometheus_client's own server answers it so, too).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

QUEUE_DEPTH = "dicom_ai_queue_depth"
SPOOL_FREE_BYTES = "dicom_ai_spool_free_bytes"
SPOOL_BYTES = "dicom_ai_spool_bytes"

# Each counter's help and label names, in the order they are exposed.
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    metrics.INSTANCES_RECEIVED: ("Instances received, stored and acknowledged.", ()),
    metrics.ASSOCIATIONS: (
        "Associations, by result: accepted, or "
        "rejected_<kind> (called_ae, calling_ae, address, tls_required, limit, "
        "application_context).",
        ("result",),
    ),
    metrics.JOBS: (
        "Job attempts that ended, by model and state: done, failed, retried.",
        ("model", "state"),
    ),
    metrics.DELIVERIES: (
        "Delivery attempts, by destination and outcome: delivered, failed (to be retried), "
        "dead_letter.",
        ("destination", "state"),
    ),
    metrics.PURGED_BYTES: (
        "Bytes of files the retention policy deleted, by kind: sources, results.",
        ("kind",),
    ),
}
_COUNTER_LABELS = {name: labels for name, (_, labels) in _COUNTERS.items()}
_HISTOGRAM_LABELS: dict[str, tuple[str, ...]] = {
    metrics.JOB_STAGE_SECONDS: ("model", "stage"),
    metrics.RESULT_LATENCY_SECONDS: ("model",),
}

_Labels = tuple[tuple[str, str], ...]


def render(index: Index, spool_dir: Path) -> tuple[bytes, str]:
    """The metrics page: its body and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(index, spool_dir))
    return generate_latest(registry), CONTENT_TYPE


class _Collector(Collector):
    def __init__(self, index: Index, spool_dir: Path) -> None:
        self._index = index
        self._spool_dir = spool_dir

    def collect(self) -> Iterable[Metric]:
        values = self._index.metric_values()
        yield from _counters(values)
        yield from _histograms(values)
        yield GaugeMetricFamily(
            QUEUE_DEPTH, "Jobs waiting for a worker.", value=self._index.queue_depth()
        )
        yield GaugeMetricFamily(
            SPOOL_FREE_BYTES,
            "Free bytes on the spool's file system.",
            value=shutil.disk_usage(self._spool_dir).free,
        )
        usage = self._index.storage_usage()
        spool = GaugeMetricFamily(
            SPOOL_BYTES,
            "Bytes the spool holds by the index's account, by kind: sources, results.",
            labels=("kind",),
        )
        spool.add_metric(["sources"], usage.instance_bytes)
        spool.add_metric(["results"], usage.result_bytes)
        yield spool


def _label_names(
    name: str, declared: dict[str, tuple[str, ...]], samples: Sequence[_Labels]
) -> tuple[str, ...]:
    """The declared label names, or for a name the index has and this module does not know
    (a newer node counting into the same index), every label its samples carry."""
    if name in declared:
        return declared[name]
    return tuple(sorted({key for labels in samples for key, _ in labels}))


def _values(labels: _Labels, names: Sequence[str]) -> list[str]:
    given = dict(labels)
    return [given.get(name, "") for name in names]


def _counters(values: MetricValues) -> Iterator[CounterMetricFamily]:
    by_name: dict[str, list[tuple[_Labels, float]]] = {name: [] for name in _COUNTERS}
    for name, labels, value in values.counters:
        by_name.setdefault(name, []).append((labels, value))
    for name, samples in by_name.items():
        help_text = _COUNTERS[name][0] if name in _COUNTERS else name
        label_names = _label_names(name, _COUNTER_LABELS, [s[0] for s in samples])
        family = CounterMetricFamily(name, help_text, labels=label_names)
        for labels, value in samples:
            family.add_metric(_values(labels, label_names), value)
        yield family


def _histograms(values: MetricValues) -> Iterator[HistogramMetricFamily]:
    by_name: dict[str, list[tuple[_Labels, list[int], int, float]]] = {
        name: [] for name in metrics.HISTOGRAMS
    }
    for name, labels, buckets, count, total in values.histograms:
        if name in metrics.HISTOGRAMS:  # the bounds of an unknown one are unknown
            by_name[name].append((labels, buckets, count, total))
    for name, samples in by_name.items():
        bounds = metrics.HISTOGRAMS[name].buckets
        label_names = _label_names(name, _HISTOGRAM_LABELS, [s[0] for s in samples])
        family = HistogramMetricFamily(name, metrics.HISTOGRAMS[name].help, labels=label_names)
        for labels, buckets, count, total in samples:
            cumulative = _cumulative(bounds, buckets, count)
            family.add_metric(_values(labels, label_names), cumulative, total)
        yield family


def _cumulative(
    bounds: Sequence[float], buckets: Sequence[int], count: int
) -> list[tuple[str, float]]:
    """The index's per-bucket counts (the last: above every bound) as Prometheus' cumulative
    ``le`` buckets, ending in +Inf. Counts kept under other bounds (metrics.py changed since)
    become the +Inf bucket alone."""
    if len(buckets) != len(bounds) + 1:
        return [("+Inf", float(count))]
    edges = [repr(float(bound)) for bound in bounds] + ["+Inf"]  # as prometheus_client
    out: list[tuple[str, float]] = []
    running = 0
    for edge, n in zip(edges, buckets, strict=True):
        running += n
        out.append((edge, float(running)))
    return out

"""The node's Prometheus metrics: names, help, labels and histogram buckets, defined once.

Values live in the index (``counters`` and ``histograms``), written in the same transaction
as the state change they count, so every receiver and worker process counts into one place,
a count is never lost or doubled by a crash, and counts survive a restart. The console's
``/metrics`` turns them into Prometheus' text format (``dicom_ai.web.metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ASSOCIATIONS",
    "DELIVERIES",
    "HISTOGRAMS",
    "INSTANCES_RECEIVED",
    "JOBS",
    "JOB_STAGE_SECONDS",
    "PURGED_BYTES",
    "RESULT_LATENCY_SECONDS",
    "Histogram",
]

INSTANCES_RECEIVED = "dicom_ai_instances_received_total"
ASSOCIATIONS = "dicom_ai_associations_total"  # {result}: accepted, rejected_<reason>
JOBS = "dicom_ai_jobs_total"  # {model, state}: done, failed, retried
DELIVERIES = "dicom_ai_deliveries_total"  # {destination, state}: delivered, failed, dead_letter
PURGED_BYTES = "dicom_ai_purged_bytes_total"  # {kind}: sources, results
JOB_STAGE_SECONDS = "dicom_ai_job_stage_seconds"  # {model, stage}: load, infer, encode
RESULT_LATENCY_SECONDS = "dicom_ai_result_latency_seconds"  # {model}


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implied


_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

HISTOGRAMS: dict[str, Histogram] = {
    h.name: h
    for h in (
        Histogram(JOB_STAGE_SECONDS, "Seconds a job spent in each stage.", _SECONDS),
        Histogram(
            RESULT_LATENCY_SECONDS,
            "Seconds from the series' last acknowledged instance to its results delivered.",
            _SECONDS,
        ),
    )
}

"""Runs written to a real MLflow server in the documented gradwatch layout
(`gradwatch.record.layout`), for the monitor and dashboard tests."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

VERDICT = {"ok": 0, "warn": 1, "alert": 2, "error": 3}
T0_MS = 1_700_000_000_000


class CountingClient:
    """A real MlflowClient that counts the calls made through it, by method name."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


def new_experiment(client: MlflowClient, prefix: str = "read") -> tuple[str, str]:
    """(name, id) of a fresh experiment: the server is shared by the whole session."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    return name, client.create_experiment(name)


def new_run(client: MlflowClient, experiment_id: str, *, name: str = "train",
            every: str | None = "10", tags: Mapping[str, str] | None = None) -> str:
    run_id: str = client.create_run(experiment_id, run_name=name, tags=dict(tags or {})).info.run_id
    if every is not None:
        client.log_batch(run_id, params=[Param("gradwatch.every", every),
                                         Param("gradwatch.threshold.alert", "0.001")])
    return run_id


def log_check(client: MlflowClient, run_id: str, step: int, rel_distance: float, verdict: str,
              *, layers: Mapping[str, float] | None = None, max_element_error: float = 1e-9,
              last_step_tag: bool = True) -> None:
    """One check in the documented layout: the metrics and tags in one log_batch."""
    timestamp = T0_MS + step * 1000
    metrics = [
        Metric("gradwatch/rel_distance", rel_distance, timestamp, step),
        Metric("gradwatch/verdict", float(VERDICT[verdict]), timestamp, step),
        Metric("gradwatch/max_element_error", max_element_error, timestamp, step),
        Metric("gradwatch/evaluations", 4.0, timestamp, step),
        Metric("gradwatch/seconds", 0.01, timestamp, step),
    ] + [Metric(f"gradwatch/layer/{name}", value, timestamp, step)
         for name, value in (layers or {}).items()]
    tags = [RunTag("gradwatch.status", verdict)]
    if last_step_tag:
        tags.append(RunTag("gradwatch.last_step", str(step)))
    client.log_batch(run_id, metrics=metrics, tags=tags)

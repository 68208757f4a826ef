"""The record's layout and delivery without a server: the writer logs what
`gradwatch.record.layout` says, readers decode what it encodes, `gradwatch.every` reads back,
and a "report" record is built by the builder the deliverer was given — or rejected without one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest

from gradwatch import ConfigError
from gradwatch.record import layout
from gradwatch.record.spool import RejectedRecord
from gradwatch.record.writer import Deliverer, check_payload, deliver_payload, report_payload
from tests.support.dashboard_runs import report


def test_the_writer_logs_the_keys_the_layout_names() -> None:
    check = report({"encoder.weight": 1e-9, "a:b": math.inf})
    payload = check_payload(check, step=7, timestamp_ms=1, run_id="r", tracking_uri=None,
                            alert="firing")
    values = {key: value for key, value, _, _ in payload["metrics"]}
    keys = layout.layer_metric_keys(check.layers)
    assert {layout.REL_DISTANCE, layout.VERDICT, layout.MAX_ELEMENT_ERROR, layout.EVALUATIONS,
            layout.SECONDS, layout.ESTIMATED, *keys.values()} == set(values)
    assert values[layout.VERDICT] == layout.VERDICT_CODES[check.verdict]
    assert layout.decode_metric(values[keys["a:b"]]) == math.inf  # ±inf travels as ±DBL_MAX
    assert payload["tags"] == {layout.STATUS_TAG: check.verdict, layout.LAST_STEP_TAG: "7",
                               layout.ALERT_TAG: "firing"}
    assert list(payload["artifacts"]) == [layout.artifact_path(7)]
    assert layout.artifact_path(7).startswith(layout.CHECKS_FOLDER + "/")
    assert layout.VERDICT_WORDS == ("ok", "warn", "alert", "error")


@pytest.mark.parametrize("every", [1000, "30min", "90s", "0 * * * *"])
def test_the_every_param_reads_back_as_it_was_given(every: int | str) -> None:
    parsed = layout.parse_every(every)
    assert layout.parse_every(parsed.describe()) == parsed


def test_a_bad_every_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="every must be a number of optimizer steps"):
        layout.parse_every("every other day")


class Client:
    """Stands in for MlflowClient: a report builder and a terminate are all these tests send."""

    def __init__(self) -> None:
        self.terminated: list[str] = []

    def set_terminated(self, run_id: str) -> None:
        self.terminated.append(run_id)


def test_a_report_record_goes_to_the_report_builder() -> None:
    built: list[tuple[Any, Mapping[str, Any]]] = []
    client = Client()
    payload = report_payload(run_id="r", tracking_uri=None, png=True)
    deliver_payload(payload, client, report_builder=lambda c, p: built.append((c, p)))
    assert built == [(client, payload)]


def test_a_report_record_without_a_builder_is_rejected_and_says_why() -> None:
    with pytest.raises(RejectedRecord, match=r"the run report needs gradwatch\.dashboard"):
        deliver_payload(report_payload(run_id="r", tracking_uri=None), Client())


def test_a_report_that_cannot_be_built_is_rejected_and_one_the_disk_refused_is_retried() -> None:
    def broken(client: Any, payload: Mapping[str, Any]) -> None:
        raise ValueError("no checks")

    def disk_full(client: Any, payload: Mapping[str, Any]) -> None:
        raise OSError("No space left on device")

    payload = report_payload(run_id="r", tracking_uri=None)
    with pytest.raises(RejectedRecord, match="could not be built: ValueError: no checks"):
        deliver_payload(payload, Client(), report_builder=broken)
    with pytest.raises(OSError, match="No space left"):  # not rejected: the spool retries it
        deliver_payload(payload, Client(), report_builder=disk_full)


def test_the_deliverer_hands_its_builder_the_run_of_a_local_id() -> None:
    built: list[Mapping[str, Any]] = []
    client = Client()
    deliverer = Deliverer(clients={"None": client},
                          report_builder=lambda c, p: built.append(p))
    deliverer.runs["local-1"] = "run-1"  # as if its "run" record had been delivered
    deliverer(report_payload(run_id=None, tracking_uri=None, local_id="local-1"))
    assert [p["run_id"] for p in built] == ["run-1"]
    with pytest.raises(RejectedRecord, match=r"gradwatch\.dashboard"):
        Deliverer(clients={"None": client})(report_payload(run_id="r", tracking_uri=None))

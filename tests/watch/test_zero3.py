"""DeepSpeed ZeRO-3 under GradWatch: 2 CPU processes (gloo, `tests/support/zero3_worker.py`).

Every parameter is partitioned across the ranks; at a check every rank enters DeepSpeed's
`GatheredParameters` (read only), rank 0 copies the modules with the full values and checks
the copy in float64 ("gathered" strategy). Training is bit-identical with and without
gradwatch; a backward bug in one linear kernel is named by its fully-qualified name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fsdp_worker import BUG
from tests.support.ranks import run_ranks, same_weights

pytest.importorskip("deepspeed")

WORKER = "tests.support.zero3_worker"



@pytest.mark.slow
def test_zero3_training_is_unchanged_and_a_clean_model_reads_ok(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "same", worker=WORKER)
    for rank in (zero, one):
        assert same_weights(rank["plain"]["weights"], rank["watched"]["weights"])
        assert rank["plain"]["losses"] == rank["watched"]["losses"]
    checked = zero["watched"]["checked"]
    assert [(step, verdict) for step, verdict, *_ in checked] == [
        (1, "ok"), (3, "ok"), (6, "ok"), (9, "ok"), (12, "ok")], [c[2] for c in checked]
    assert all(s["kind"] == "zero3" and s["strategy"] == "gathered" for *_, s in checked)
    assert one["watched"]["checked"] == []  # only rank 0 checks and records


@pytest.mark.slow
def test_a_kernel_bug_under_zero3_alerts_naming_its_parameter(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "bug", worker=WORKER)
    checked = zero["watched"]["checked"]
    assert {verdict for _, verdict, *_ in checked} == {"alert"}
    assert all(worst[0] == BUG and f"layer '{BUG}'" in reasons
               for _, _, reasons, worst, _ in checked)
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])

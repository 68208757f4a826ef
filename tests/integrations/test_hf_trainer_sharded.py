"""The HF Trainer with FSDP2 (`fsdp_config={"version": 2}`) and GradWatch as its callback, on
2 CPU processes (`tests/support/hf_fsdp_worker.py`, which makes accelerate take its FSDP
plugin on CPU as it does on a GPU machine). The callback gets the `fully_shard`-ed model and no
batch: every rank captures its own inputs; both strategies check it, training is bit-identical
with and without gradwatch, the planted bug is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fsdp_worker import BUG
from tests.support.hf_fsdp_worker import EVERY, STEPS
from tests.support.ranks import run_ranks, same_weights

pytest.importorskip("accelerate")

WORKER = "tests.support.hf_fsdp_worker"



@pytest.mark.slow
def test_hf_trainer_fsdp2_is_checked_by_both_strategies_without_changing_training(
    tmp_path: Path
) -> None:
    plain = run_ranks(tmp_path / "plain", "none", worker=WORKER)
    assert all(rank["fsdp2"] for rank in plain)  # the Trainer really sharded the model
    due = [1, *range(EVERY, STEPS + 1, EVERY)]  # every rank captures from on_train_begin
    for strategy in ("gathered", "collective"):
        watched = run_ranks(tmp_path / strategy, strategy, worker=WORKER)
        for before, after in zip(plain, watched):
            assert same_weights(before["weights"], after["weights"])
            assert before["losses"] == after["losses"]
        checked = watched[0]["checked"]
        assert [step for step, *_ in checked] == due
        assert {verdict for _, verdict, *_ in checked} == {"ok"}
        assert {used for *_, used in checked} == {strategy}


@pytest.mark.slow
def test_hf_trainer_fsdp2_bug_is_named_under_the_collective_strategy(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "collective-bug", worker=WORKER)
    assert {verdict for _, verdict, *_ in zero["checked"]} == {"alert"}
    assert all(worst == [BUG] for _, _, worst, _ in zero["checked"])
    assert [c[:2] for c in one["checked"]] == [c[:2] for c in zero["checked"]]

"""Lightning's `ModelParallelStrategy` (FSDP2 `fully_shard` in `configure_model`) with
`GradWatchCallback` on 2 CPU processes: both sharded strategies run through the Lightning
adapter, training is bit-identical with and without gradwatch, and the planted bug is named by
its fully-qualified name. Lightning launches the second process itself; each run is bounded by
a hard timeout (a hang fails the test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.fsdp_worker import BUG
from tests.support.lightning_fsdp_worker import EVERY, STEPS
from tests.support.ranks import ROOT, TIMEOUT, free_port, same_weights

pytest.importorskip("lightning")

NAME = f"model.{BUG}"  # the LightningModule holds the LLaMA as `self.model`


def _fit(out: Path, strategy: str, bug: bool) -> list[dict[str, Any]]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.lightning_fsdp_worker", str(out), strategy,
             "1" if bug else "0"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Lightning FSDP2 ({strategy}) did not finish within {TIMEOUT} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank-{rank}.pt") for rank in range(2)]



@pytest.mark.slow
def test_lightning_fsdp2_is_checked_by_both_strategies_without_changing_training(
    tmp_path: Path
) -> None:
    plain = _fit(tmp_path / "plain", "none", bug=False)
    due = [1, *range(EVERY, STEPS + 1, EVERY)]  # first_step, then every EVERY steps
    for strategy in ("gathered", "collective"):
        watched = _fit(tmp_path / strategy, strategy, bug=False)
        for before, after in zip(plain, watched):
            assert same_weights(before["weights"], after["weights"])
            assert before["losses"] == after["losses"]  # the copies never ran the live step
            assert len(after["losses"]) == STEPS
        checked = watched[0]["checked"]
        assert [step for step, *_ in checked] == due
        assert {verdict for _, verdict, *_ in checked} == {"ok"}
        assert {used for *_, used in checked} == {strategy}


@pytest.mark.slow
def test_lightning_fsdp2_bug_is_named_under_the_collective_strategy(tmp_path: Path) -> None:
    zero, one = _fit(tmp_path / "bug", "collective", bug=True)
    assert {verdict for _, verdict, *_ in zero["checked"]} == {"alert"}
    assert all(worst == [NAME] for _, _, worst, _ in zero["checked"])
    assert [c[:2] for c in one["checked"]] == [c[:2] for c in zero["checked"]]


@pytest.mark.slow
def test_lightning_fsdp_strategy_fsdp1_is_gathered_through_its_root_wrapper(
    tmp_path: Path
) -> None:
    """FSDPStrategy wraps the LightningModule in a root FSDP1 wrapper that owns the module's
    own layers (embeddings, head): the adapter checks through that root, so every parameter
    is unsharded; the names are the module's (no `_fsdp_wrapped_module`)."""
    plain = _fit(tmp_path / "plain", "fsdp1-none", bug=False)
    watched = _fit(tmp_path / "watched", "fsdp1", bug=False)
    for before, after in zip(plain, watched):
        assert same_weights(before["weights"], after["weights"])
        assert before["losses"] == after["losses"]
    checked = watched[0]["checked"]
    assert [step for step, *_ in checked] == [1, *range(EVERY, STEPS + 1, EVERY)]
    assert {verdict for _, verdict, *_ in checked} == {"ok"}
    buggy = _fit(tmp_path / "bug", "fsdp1", bug=True)[0]["checked"]
    assert {verdict for _, verdict, *_ in buggy} == {"alert"}
    assert all(worst == [NAME] for _, _, worst, _ in buggy)

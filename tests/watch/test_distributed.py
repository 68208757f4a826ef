"""GradWatch under torch.distributed: 2 CPU processes (gloo) training a DDP model.

Only rank zero checks and records; the ranks meet after each check and stop together; training
is bit-identical to the same DDP training without gradwatch. A hang fails the test by timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from tests.support.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(out: Path, scenario: str, extra_env: dict[str, str] | None = None
              ) -> list[dict[str, Any]]:
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **(extra_env or {})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tests.support.ddp_worker", str(out), scenario], cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"the DDP ranks did not finish within {TIMEOUT} s (a deadlock?)")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return [torch.load(out / f"rank-{rank}.pt") for rank in range(2)]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_ddp_training_is_unchanged_and_only_rank_zero_checks(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"ddp-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    zero, one = run_ranks(tmp_path, "same", {"MLFLOW_TRACKING_URI": mlflow_server.url,
                                             "MLFLOW_RUN_ID": run_id})
    for rank in (zero, one):
        assert_same_weights(rank["plain"]["weights"], rank["watched"]["weights"])
        assert rank["plain"]["losses"] == rank["watched"]["losses"]
    assert_same_weights(zero["watched"]["weights"], one["watched"]["weights"])
    assert [step for step, _, _ in zero["watched"]["checked"]] == [1, 3, 6, 9, 12]
    assert {verdict for _, verdict, _ in zero["watched"]["checked"]} == {"ok"}
    assert one["watched"]["checked"] == []
    history = client.get_metric_history(run_id, "gradwatch/rel_distance")
    assert sorted(m.step for m in history) == [1, 3, 6, 9, 12]


@pytest.mark.slow
def test_on_alert_stop_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "stop")
    assert [(step, verdict) for step, verdict, _ in zero["watched"]["checked"]] == [(3, "alert")]
    assert zero["watched"]["stopped_at"] == one["watched"]["stopped_at"] == 3
    assert_same_weights(zero["watched"]["weights"], one["watched"]["weights"])


@pytest.mark.slow
def test_wall_clock_schedule_agrees_every_step_without_deadlock(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "clock")
    assert [step for step, _, _ in zero["watched"]["checked"]] == [1]  # first_step, then 30 min
    assert len(zero["watched"]["losses"]) == len(one["watched"]["losses"]) == 12


@pytest.mark.slow
def test_fsdp_is_refused_once_with_the_reason_and_training_goes_on(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "fsdp")
    [(step, verdict, reasons)] = zero["watched"]["checked"]  # one error check, then no more
    assert (step, verdict) == (1, "error")
    assert "DTensor" in reasons and "unsharded copy" in reasons
    assert zero["watched"]["unsupported"] and one["watched"]["checked"] == []
    assert len(zero["watched"]["losses"]) == len(one["watched"]["losses"]) == 12

"""Run a test scenario as 2 CPU processes of one torch.distributed job (gloo).

`run_ranks(out, scenario, worker=...)` starts `python -m <worker> OUT SCENARIO` once per rank
with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, waits for both with a hard timeout (a hang
fails the test instead of the CI) and returns what each rank saved to `OUT/rank-<r>.pt`.
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

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(out: Path, scenario: str, extra_env: dict[str, str] | None = None,
              worker: str = "tests.support.ddp_worker") -> list[dict[str, Any]]:
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **(extra_env or {})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", worker, str(out), scenario], cwd=ROOT,
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
        pytest.fail(f"the ranks of {worker} {scenario} did not finish within {TIMEOUT} s "
                    f"(a deadlock?)")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return [torch.load(out / f"rank-{rank}.pt") for rank in range(2)]


def save_and_leave(result: dict[str, Any], out: Path, rank: int) -> None:
    """A worker's end: its result to `out/rank-<rank>.pt`, the ranks meet, the process group
    goes, and the process exits 0 at once. torch 2.13's gloo sometimes aborts in its C++
    teardown at interpreter exit ("terminate called without an active exception", seen in 1
    of ~90 worker runs here, after the result was saved): those destructors are not run."""
    import torch.distributed as dist

    torch.save(result, out / f"rank-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same names and bit-identical values (weights saved by two runs or two ranks)."""
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

"""One rank of a 2-process DDP training (gloo, CPU), run by tests/watch/test_distributed.py.

    python -m tests.support.ddp_worker OUT_DIR SCENARIO
    (env: RANK, WORLD_SIZE, MASTER_ADDR/PORT)

Scenarios:
  same      train twice in the same process group, without and with GradWatch(every=3); write
            both final weights, the losses and the checked steps.
  stop      a planted backward bug and on_alert="stop": every rank must stop at the same step.
  clock     a wall-clock schedule (only rank zero runs the scheduler): the per-step agreement
            must not deadlock.
  fsdp      an FSDP2 (fully_shard) model: every rank takes part in each check, rank 0 checks
            the gathered copy, training goes on on every rank.
The result of each rank is `OUT_DIR/rank-<r>.pt`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradwatch import GradWatch
from tests.support.ranks import save_and_leave
from tests.support.torch_models import BuggyLinear, mse_loss, regression_batch, seeded

STEPS = 12


def make_model(bug: str = "none") -> nn.Module:
    with seeded(0):
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2),
                             BuggyLinear(6, 3, bug))  # type: ignore[arg-type]


def fsdp_model() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(watch: GradWatch | None, rank: int, bug: str = "none", fsdp: bool = False
          ) -> dict[str, Any]:
    torch.manual_seed(1234 + rank)  # dropout masks differ across ranks, as in real training
    model: Any = fsdp_model() if fsdp else DistributedDataParallel(make_model(bug))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, checked, stopped_at = [], [], None
    for step in range(1, STEPS + 1):
        x, y = regression_batch(8, 4, 3, seed=100 * step + rank)  # each rank its own shard
        loss = mse_loss(model, (x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if watch is not None:
            report = watch.step(model, (x, y), step=step)
            if report is not None:
                checked.append((step, report.verdict, " ".join(report.reasons)))
            if watch.should_stop:
                stopped_at = step
                break
    if watch is not None:
        watch.close()
    if fsdp:
        return {"losses": losses, "checked": checked, "unsupported": watch and watch.unsupported}
    weights = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {"weights": weights, "losses": losses, "checked": checked, "stopped_at": stopped_at}


def main(out: Path, scenario: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spool = out / "spool"

    def watch(**kwargs: Any) -> GradWatch:
        return GradWatch(loss_fn=mse_loss, mlflow=rank == 0 and "MLFLOW_TRACKING_URI" in
                         os.environ, spool_dir=spool, **kwargs)

    result: dict[str, Any]
    if scenario == "same":
        result = {"plain": train(None, rank), "watched": train(watch(every=3), rank)}
    elif scenario == "stop":
        result = {"watched": train(watch(every=3, first_step=False, on_alert="stop"), rank,
                                   bug="scaled")}
    elif scenario == "fsdp":
        result = {"watched": train(watch(every=3), rank, fsdp=True)}
    elif scenario == "clock":
        result = {"watched": train(watch(every="30min"), rank)}
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    save_and_leave(result, out, rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

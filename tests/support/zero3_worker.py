"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo): `python -m tests.support.zero3_worker OUT
SCENARIO`, run once per rank by `tests.support.ranks.run_ranks`.

The HF zoo's tiny LLaMA is given to `deepspeed.initialize` with a stage-3 config (every
parameter partitioned across the ranks, `stage3_param_persistence_threshold: 0`) and trained
with plain SGD through the engine (`engine(**batch)`, `engine.backward`, `engine.step`);
`GradWatch.step(engine.module, batch, ...)` is called on every rank.

Scenarios:
  same  clean, without and with GradWatch(every=3): losses and full weights compared.
  bug   a linear kernel whose backward scales row 1 of dW by 1.5 in `BUG` (the module's
        class swapped for one computing through `_RowBugLinear`): checks must alert naming it.
        (`plant_row_bug` hands the parameter out through `__getattr__`, which DeepSpeed's
        parameter fetching bypasses: its bug would not be in ZeRO-3 training at all.)

DeepSpeed's CPU accelerator JIT-compiles an optional shared-memory all-reduce (g++ and ninja,
~90 s the first time) when its communication starts; gloo does the reductions here, so the
build is skipped (`build_shm_op`), as it is where no compiler is installed.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from tests.support.fsdp_worker import BUG, STEPS
from tests.support.hf_zoo import make_zoo
from tests.support.ranks import save_and_leave

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10_000,
}


class _RowBugLinear(torch.autograd.Function):
    """y = x Wᵀ with a correct forward; the backward's dW has row 1 scaled by 1.5 (a kernel
    bug in the weight gradient only; dx is right)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_weight = grad_out.flatten(0, -2).T @ x.flatten(0, -2)
        grad_weight[1] *= 1.5
        return grad_out @ weight, grad_weight


class _RowBugLinearModule(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = _RowBugLinear.apply(x, self.weight)
        return output


def plant_kernel_bug(model: Any) -> None:
    module = model.get_submodule(BUG.rpartition(".")[0])
    assert type(module) is torch.nn.Linear and module.bias is None
    module.__class__ = _RowBugLinearModule


def engine_of(bug: bool) -> Any:
    import deepspeed

    torch.manual_seed(0)
    model = make_zoo("eager")["llama"].build()
    if bug:
        plant_kernel_bug(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CONFIG)
    return engine


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return {name: value.detach().clone() for name, value in engine.module.named_parameters()}


def train(watch: Any, rank: int, engine: Any) -> dict[str, Any]:
    entry = make_zoo("eager")["llama"]
    losses, checked = [], []
    for step in range(1, STEPS + 1):
        batch = entry.batch(100 * step + rank)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if watch is not None:
            report = watch.step(engine.module, batch, step=step)
            if report is not None:
                checked.append((step, report.verdict, " ".join(report.reasons),
                                [name for name, _ in report.worst_layers(3)],
                                report.probe.get("sharding")))
    if watch is not None:
        watch.close()
    return {"losses": losses, "checked": checked, "weights": full_weights(engine)}


def main(out: Path, scenario: str) -> None:
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    import deepspeed

    from gradwatch import GradWatch

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    rank = torch.distributed.get_rank()

    def watch() -> GradWatch:
        return GradWatch(every=3, mlflow=False, spool_dir=out / "spool", budget=60)

    if scenario == "same":
        result = {"plain": train(None, rank, engine_of(False)),
                  "watched": train(watch(), rank, engine_of(False))}
    elif scenario == "bug":
        result = {"watched": train(watch(), rank, engine_of(True))}
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    save_and_leave(result, out, rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

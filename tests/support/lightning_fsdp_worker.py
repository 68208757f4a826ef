"""Lightning `ModelParallelStrategy` (FSDP2 `fully_shard` in `configure_model`) or `FSDPStrategy`
(FSDP1) on 2 CPU processes, with and without `GradWatchCallback`: `python -m
tests.support.lightning_fsdp_worker OUT STRATEGY BUG` where STRATEGY is "none" (no gradwatch),
"gathered" or "collective" (FSDP2), "fsdp1-none" or "fsdp1" (FSDP1, gathered) and BUG is 0 or 1
(the one-row ×1.5 backward bug of `tests/support/fsdp_worker.py` in
`model.model.layers.0.mlp.up_proj.weight`). Lightning launches rank 1 itself (it runs this
command again with LOCAL_RANK set). Each rank saves its verdicts, the names its alerting checks
put first, the strategy the checks took, the losses and the full final weights to
`OUT/rank-<r>.pt`.

Lightning refuses `FSDPStrategy` on CPU (`type(strategy) is FSDPStrategy` with accelerator
"cpu"), and FSDP1 refuses `device_id=None`, which is what Lightning passes on CPU: `_CPUFSDP`
is a subclass that wraps with `device_id=cpu` as Lightning wraps with the GPU index; the rest
(the auto-wrap policy on the decoder layers, `use_orig_params=True`, the loop) is Lightning's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from tests.support.fsdp_worker import BUG
from tests.support.hf_zoo import make_zoo, plant_row_bug

STEPS = 8
EVERY = 2


def _cpu_fsdp_class() -> Any:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDP(FSDPStrategy):  # type: ignore[misc]
        def _setup_model(self, model: Any) -> Any:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                    **self.kwargs)
            return super()._setup_model(model)

    return CPUFSDP


def main(out: Path, strategy: str, bug: bool) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from gradwatch import CheckOptions
    from gradwatch.integrations.lightning import GradWatchCallback

    _CPUFSDP = _cpu_fsdp_class()

    entry = make_zoo("eager")["llama"]
    fsdp1 = strategy.startswith("fsdp1")

    def built() -> Any:
        torch.manual_seed(0)
        model = entry.build()
        if bug:
            plant_row_bug(model, BUG, row=1)
        return model

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []
            if fsdp1:
                self.model = built()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            if fsdp1:
                return
            self.model = built()
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> Any:
            batches = [entry.batch(100 * step + self.global_rank) for step in range(STEPS)]
            return torch.utils.data.DataLoader(batches, batch_size=None)

    callbacks = []
    if strategy not in ("none", "fsdp1-none"):
        callbacks.append(GradWatchCallback(
            every=EVERY, mlflow=False, budget=60, spool_dir=out / "spool",
            check=CheckOptions(sharded="gathered" if fsdp1 else strategy)))  # type: ignore
    module = Module()
    if fsdp1:
        layer = type(entry.build().model.layers[0])
        sharding: Any = _CPUFSDP(auto_wrap_policy={layer}, process_group_backend="gloo")
    else:
        sharding = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        strategy=sharding, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(module)
    rank = trainer.global_rank
    reports = callbacks[0].watch.reports if callbacks else []
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model,
                                                         writeback=False):
            weights = {name: value.detach().clone()
                       for name, value in module.model.named_parameters()}
    else:
        weights = {name: value.full_tensor().detach().clone()
                   for name, value in module.model.state_dict().items()}
    result = {
        "losses": module.losses,
        "checked": [(r.probe.get("step"), r.verdict,
                     [name for name, _ in r.worst_layers(1)],
                     (r.probe.get("sharding") or {}).get("strategy")) for r in reports],
        "weights": weights,
    }
    torch.save(result, out / f"rank-{rank}.pt")
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's teardown can abort at exit (tests/support/ranks.py)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")

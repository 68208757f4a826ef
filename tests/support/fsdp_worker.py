"""One rank of a 2-process FSDP2 training (gloo, CPU), run by tests/watch/test_sharded.py.

    python -m tests.support.fsdp_worker OUT_DIR SCENARIO
    (env: RANK, WORLD_SIZE, MASTER_ADDR/PORT)

The model is the HF zoo's tiny LLaMA (RMSNorm, rotary, its own causal-LM loss on right-padded
collated batches), each decoder layer and the root `fully_shard`-ed over both ranks.

Scenarios:
  same   train twice in one process group, without and with GradWatch(every=3); write the
         final full weights, the losses and the checks of each.
  bug    a one-row ×1.5 backward bug in layer 0's `mlp.up_proj.weight` (training runs it too),
         GradWatch(every=3): the checks must alert and name that parameter.
  fail   rank 1 fails while taking its shards at the second check: both ranks must say "error"
         for that check (rank 0 records it) and go on; the later checks run again.
  stall  rank 1 stalls 8 s inside the second check's gather, with a 3 s collective timeout:
         no rank may hang; the stalled check reads "error" and training finishes.
  collective  the collective strategy forced (no rank gathers): clean without and with
         GradWatch(every=1), then the bug with every=3.
  collective_fail  rank 1 raises inside the second collective check.
  collective_captured  the bug, collective, step(model, None): every rank checks on the inputs
         of its latest training forward (captured on every rank, as under the HF Trainer).
  stop   the bug with on_alert="stop", gathered then collective: every rank stops at the
         first check's step.
  collective_stall  rank 1 stalls 8 s at the second collective check's first reduction, with a
         3 s timeout: that check reads "error" on both ranks, nothing hangs, the next ones run.
  auto_collective  sharded="auto" with rank 0's host short of memory: the collective strategy
         is chosen on every rank (rank 1's own estimate would fit); the buggy model.
  collective_check_module  check_module(options={"sharded": "collective"}) on every rank,
         each on its own batch, clean and buggy: the reports (as JSON).
  collective_float32  the same when no rank can build the float64 twin (evaluations in place
         in float32).
  fsdp1  the same model under FSDP1 (flat parameters): clean twice (without and with
         GradWatch(every=3)), then with the bug.
  check_module  `gradwatch.check_module` called on every rank, on the clean and on the buggy
         model: every rank gets rank 0's report.
  collective_batchnorm  Linear-BatchNorm1d-Tanh-Linear under FSDP2, trained 3 steps, then
         check_module(sharded="collective"): the float64 twin takes BatchNorm's running
         statistics in float64 (eval mode mixes them with the float64 activations).
  mlp    the small MLP of tests/support/ddp_worker.py under FSDP2: checks run and pass.
The result of each rank is `OUT_DIR/rank-<r>.pt`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gradwatch.engine.sharded as sharded
from gradwatch import CheckOptions, GradWatch
from gradwatch import check_module as gradwatch_check
from tests.support.hf_zoo import make_zoo, plant_row_bug
from tests.support.ranks import same_weights, save_and_leave

STEPS = 12
BUG = "model.layers.0.mlp.up_proj.weight"


def llama(bug: bool) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_zoo("eager")["llama"].build()
    if bug:
        plant_row_bug(model, BUG, row=1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def llama_fsdp1(bug: bool) -> Any:
    """The same model under FSDP1: each decoder layer and the root wrapped (flat parameters,
    use_orig_params=False)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = make_zoo("eager")["llama"].build()
    if bug:
        plant_row_bug(model, BUG, row=1)
    layer = type(model.model.layers[0])
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                    auto_wrap_policy=ModuleWrapPolicy({layer}))


def mlp() -> Any:
    from tests.support.ddp_worker import fsdp_model

    return fsdp_model()



def full_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every rank: the full values (a collective), as the plain twin's weights are compared."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return {name: value.detach().clone() for name, value in model.named_parameters()}
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value)
            .detach().clone() for name, value in model.state_dict().items()}


def train(watch: GradWatch | None, rank: int, model: Any, batches: Any,
          loss: Any = None, give_batch: bool = True) -> dict[str, Any]:
    torch.manual_seed(1234 + rank)  # dropout masks differ across ranks, as in real training
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, checked = [], []
    for step in range(1, STEPS + 1):
        batch = batches(100 * step + rank)  # each rank its own shard of the data
        value = loss(model, batch) if loss is not None else model(**batch).loss
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
        if watch is not None:
            report = watch.step(model, batch if give_batch else None, step=step, loss_fn=loss)
            if report is not None:
                checked.append((step, report.verdict, " ".join(report.reasons),
                                [name for name, _ in report.worst_layers(3)],
                                report.probe.get("sharding")))
            if watch.should_stop:  # on_alert="stop": every rank at the same step
                break
    if watch is not None:
        watch.close()
    return {"losses": losses, "checked": checked, "weights": full_weights(model)}


def main(out: Path, scenario: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    entry = make_zoo("eager")["llama"]

    def watch(every: int = 3, timeout: float | None = None, strategy: str = "auto",
              on_alert: str = "continue") -> GradWatch:
        made = GradWatch(every=every, mlflow=rank == 0 and "MLFLOW_TRACKING_URI" in os.environ,
                         spool_dir=out / "spool", budget=60, on_alert=on_alert,
                         check=CheckOptions(sharded=strategy))  # type: ignore[arg-type]
        if timeout is not None:
            made._gather_timeout = timeout  # seconds; the default (120) is tested by "fail"
        return made

    result: dict[str, Any]
    if scenario == "same":
        result = {"plain": train(None, rank, llama(False), entry.batch),
                  "watched": train(watch(every=1), rank, llama(False), entry.batch)}
    elif scenario == "bug":
        result = {"watched": train(watch(), rank, llama(True), entry.batch)}
    elif scenario == "fail":
        calls = {"n": 0}
        take = sharded._local_shards

        def flaky(model: Any, world: int) -> Any:  # this rank crashes at the second check
            calls["n"] += 1
            if rank == 1 and calls["n"] == 2:
                raise MemoryError("rank 1 ran out of host memory (planted by the test)")
            return take(model, world)

        sharded._local_shards = flaky  # type: ignore[assignment]
        result = {"watched": train(watch(), rank, llama(False), entry.batch)}
    elif scenario == "stall":
        gather = sharded._gather_one
        calls = {"n": 0}

        def slow(*args: Any) -> Any:  # rank 1 stalls in the second check's first gather
            calls["n"] += 1
            if rank == 1 and calls["n"] == len(list(model.parameters())) + 1:
                time.sleep(8)
            return gather(*args)

        model = llama(False)
        sharded._gather_one = slow  # type: ignore[assignment]
        result = {"watched": train(watch(timeout=3), rank, model, entry.batch)}
    elif scenario == "fsdp1":
        result = {"plain": train(None, rank, llama_fsdp1(False), entry.batch),
                  "watched": train(watch(), rank, llama_fsdp1(False), entry.batch),
                  "bug": train(watch(), rank, llama_fsdp1(True), entry.batch)}
    elif scenario == "check_module":
        import gradwatch

        result = {}
        for name, bug in (("clean", False), ("buggy", True)):
            report = gradwatch.check_module(llama(bug), entry.batch(7), budget=60)
            result[name] = (report.verdict, report.worst_layers(1)[0][0],
                            report.probe["sharding"]["strategy"])
    elif scenario == "collective":
        result = {"plain": train(None, rank, llama(False), entry.batch),
                  "watched": train(watch(every=1, strategy="collective"), rank, llama(False),
                                   entry.batch),
                  "bug": train(watch(strategy="collective"), rank, llama(True), entry.batch)}
    elif scenario == "stop":  # the bug, on_alert="stop", each strategy in turn
        result = {strategy: train(watch(strategy=strategy, on_alert="stop"), rank, llama(True),
                                  entry.batch) for strategy in ("gathered", "collective")}
    elif scenario == "collective_stall":
        import gradwatch.engine.collective as collective

        checks = {"n": 0, "slept": False}
        inner, reduce = collective._collective, collective._Run.reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            checks["n"] += 1
            return inner(*args, **kwargs)

        def slow(self: Any, values: list[float]) -> list[float]:
            if rank == 1 and checks["n"] == 2 and not checks["slept"]:
                checks["slept"] = True  # rank 1 stalls at the second check's first reduction
                time.sleep(8)
            return reduce(self, values)

        collective._collective = counted  # type: ignore[assignment]
        collective._Run.reduce = slow  # type: ignore[method-assign]
        result = {"watched": train(watch(timeout=3, strategy="collective"), rank, llama(False),
                                   entry.batch)}
    elif scenario == "auto_collective":
        if rank == 0:  # rank 0's host has 0.5 MiB free: its word decides for every rank
            sharded._available_memory = lambda: 1 << 19  # type: ignore[assignment]
        result = {"watched": train(watch(), rank, llama(True), entry.batch)}
    elif scenario == "collective_captured":
        result = {"watched": train(watch(strategy="collective"), rank, llama(True), entry.batch,
                                   give_batch=False)}
    elif scenario == "collective_fail":
        import gradwatch.engine.collective as collective

        calls = {"n": 0}
        tensors = collective._tensors

        def flaky(model: Any) -> Any:  # rank 1 fails inside the second check
            calls["n"] += 1
            if rank == 1 and calls["n"] == 3:
                raise MemoryError("rank 1 ran out of memory (planted by the test)")
            return tensors(model)

        collective._tensors = flaky  # type: ignore[assignment]
        result = {"watched": train(watch(strategy="collective"), rank, llama(False),
                                   entry.batch)}
    elif scenario in ("collective_check_module", "collective_float32"):
        import gradwatch
        import gradwatch.engine.collective as collective

        if scenario == "collective_float32":
            def no_twin(model: Any) -> Any:
                raise MemoryError("no room for a float64 twin (planted by the test)")

            collective.float64_twin = no_twin  # type: ignore[assignment]
        result = {}
        for name, bug in (("clean", False), ("buggy", True)):
            model = llama(bug)
            model(**entry.batch(3)).loss.backward()  # FSDP2 initialised, .grad set
            before = full_weights(model)
            grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
            report = gradwatch.check_module(model, entry.batch(7 + rank),
                                            options={"budget": 60, "sharded": "collective"})
            result[name] = report.model_dump(mode="json")
            result[name]["untouched"] = same_weights(before, full_weights(model)) and all(
                torch.equal(grads[n], p.grad.to_local()) for n, p in model.named_parameters())
    elif scenario == "collective_batchnorm":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from tests.support.torch_models import mse_loss, regression_batch

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16),
                                  torch.nn.Tanh(), torch.nn.Linear(16, 3))
        fully_shard(net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(3):  # BatchNorm's running statistics move away from (0, 1)
            optimizer.zero_grad()
            mse_loss(net, regression_batch(16, 4, 3, seed=10 * step + rank)).backward()
            optimizer.step()
        report = gradwatch_check(net, regression_batch(16, 4, 3, seed=99 + rank), mse_loss,
                                 options={"budget": 60, "sharded": "collective"})
        result = {"report": report.model_dump(mode="json")}
    elif scenario == "mlp":
        from tests.support.torch_models import mse_loss, regression_batch

        result = {"watched": train(watch(), rank, mlp(),
                                   lambda seed: regression_batch(8, 4, 3, seed=seed), mse_loss)}
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    save_and_leave(result, out, rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

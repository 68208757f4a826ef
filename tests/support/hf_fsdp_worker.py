"""The HF Trainer with FSDP2 (`fsdp_config={"version": 2}`, decoder layers wrapped) on 2 CPU
processes, with GradWatch as its callback: `python -m tests.support.hf_fsdp_worker OUT
SCENARIO` with SCENARIO "none" (no gradwatch), "gathered", "collective" or "collective-bug"
(the one-row ×1.5 backward bug of `tests/support/fsdp_worker.py`), run once per rank by
`tests.support.ranks.run_ranks`.

accelerate (1.16) turns FSDP on only for accelerator types (`MULTI_GPU`, ...); on CPU
(`MULTI_CPU`) it drops the FSDP plugin without a word and the Trainer trains with DDP. To run
the Trainer's real FSDP2 path here, `_fsdp_on_cpu` makes `AcceleratorState` take the plugin on
CPU as it does on a GPU machine; everything else (the wrapping, the training loop, the
callback's arguments) is the Trainer's own. GradWatch sees what it sees under FSDP2 on GPUs:
`kwargs["model"]` is the `fully_shard`-ed model and no batch (it captures each rank's inputs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from tests.support.fsdp_worker import BUG
from tests.support.hf_zoo import make_zoo, plant_row_bug
from tests.support.ranks import save_and_leave

STEPS = 6
EVERY = 2


def _fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.device = torch.device("cpu")
            state.PartialState._shared_state["device"] = torch.device("cpu")

    state.AcceleratorState.__init__ = init  # type: ignore[method-assign]


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (64, 12), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def main(out: Path, scenario: str) -> None:
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    _fsdp_on_cpu()
    from transformers import Trainer, TrainingArguments

    from gradwatch import CheckOptions, GradWatch

    torch.manual_seed(0)
    model = make_zoo("eager")["llama"].build()
    if scenario.endswith("-bug"):
        plant_row_bug(model, BUG, row=1)
    strategy = scenario.removesuffix("-bug")
    callbacks = []
    if strategy != "none":
        callbacks.append(GradWatch(every=EVERY, mlflow=False, budget=60,
                                   spool_dir=out / "spool",
                                   check=CheckOptions(sharded=strategy)))  # type: ignore[arg-type]
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, fsdp=True,
        fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        max_steps=STEPS, per_device_train_batch_size=2, learning_rate=0.05,
        logging_steps=1, save_strategy="no", report_to=[], ddp_backend="gloo",
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)
    trainer.train()
    live = trainer.model
    fsdp2 = any(type(p).__name__ == "DTensor" for p in live.parameters())
    reports = callbacks[0].reports if callbacks else []
    save_and_leave({
        "fsdp2": fsdp2,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "checked": [(r.probe.get("step"), r.verdict,
                     [name for name, _ in r.worst_layers(1)] or r.reasons[:1],  # or why not
                     (r.probe.get("sharding") or {}).get("strategy")) for r in reports],
        "weights": {name: value.full_tensor().detach().clone()
                    for name, value in live.state_dict().items()},
    }, out, int(os.environ["RANK"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

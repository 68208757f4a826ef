"""A tiny BERT built from a config (no downloads) and synthetic data for Trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCABULARY = 48
LENGTH = 12


def tiny_bert(seed: int = 0) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=LENGTH, num_labels=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config)


def token_dataset(n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Labels depend on the tokens (whether token 7 occurs), so there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCABULARY, (LENGTH,), generator=generator)
        rows.append({
            "input_ids": ids,
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": torch.tensor(int((ids == 7).any())),
        })
    return rows


def training_args(output_dir: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "seed": 0,
        "data_seed": 0,
        "use_cpu": True,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(model: Any, args: Any, callbacks: list[Any] = ()) -> Any:  # type: ignore[assignment]
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    return trainer

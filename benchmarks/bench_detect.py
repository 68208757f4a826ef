"""Does gradwatch catch a one-row backward bug at the budget every=1000 gives it? One run.

    python benchmarks/bench_detect.py            # ~6 minutes on 2 shared CPU cores
    python benchmarks/bench_detect.py --quick    # ~1 minute: 8 checks per clean twin
    python benchmarks/bench_detect.py --failures /tmp/bench_detect_failures.txt

Four architectures train with Adam on fixed synthetic data (deterministic seeds), float32:

* GPT-2: `GPT2LMHeadModel` from a config (n_embd 64, 4 layers, vocabulary 256, sequences of at
  most 32 tokens) on sequences drawn from a fixed random bigram chain, right-padded as
  `DataCollatorForLanguageModeling(mlm=False)` pads them with pad = eos (attention mask 0 and
  label -100 on every pad-id position);
* BERT: `BertForMaskedLM` (hidden 64, 4 layers) on the same kind of sequences between [CLS] and
  [SEP], [PAD]-padded, 15% of the ordinary tokens masked as the MLM collator masks them
  (80% [MASK], 10% a random token, 10% kept; label -100 elsewhere);
* CNN: three conv 3x3 / BatchNorm / ReLU / maxpool blocks and a linear head on random 3x32x32
  images, labelled by a fixed random linear teacher of the pooled image;
* LSTM: Embedding, a 2-layer `nn.LSTM`, LayerNorm and a linear decoder, next-token prediction
  on the bigram sequences.

The budget. `GradWatch(budget=None)` (the default) gives each check
    allowed seconds = overhead x (steps since the last check) x (seconds per training step),
so `GradWatch(every=10, overhead=0.5)` gives each check exactly the seconds that the default
`GradWatch(every=1000, overhead=0.005)` would: 0.5 x 10 = 0.005 x 1000 = 5 training steps.
Every run here uses every=10, overhead=0.5 (first_step=True, probe_rows=8 and the rest at their
defaults, mlflow=False, report=False), so a check sees the every=1000 budget after 10 steps.
torch runs on `--threads` threads and numpy's BLAS (which gradwatch's engine uses) on
`--blas-threads` (both default 1: on a small shared machine a second thread makes step times,
and so budgets, swing with the neighbours' load; on such a machine numpy's default 2 BLAS
threads were seen to make a check's fixed part ~50x slower, `--blas-threads 0` keeps them).

Bugs. For each architecture a one-row x1.5 backward bug (the gradient autograd reports for row 1
of the tensor is multiplied by 1.5; the forward is unchanged) is planted in an early, a middle
and a late 2-D weight tensor, one fresh run each, at step `--plant-at` (default 15: after the
checks at steps 1 and 10, so the first check after the bug is the one at step 20). Transformer
and CNN tensors are planted with `tests/hf_zoo.plant_row_bug`. `nn.LSTM` runs on its list
`_flat_weights`; with plant_row_bug its forward (torch 2.13) does see the bugged weight, but
only because each read hands out a new tensor, which makes the LSTM rebuild `_flat_weights`
from the bug's non-leaf outputs and keep them, and then `copy.deepcopy` of the model (how
gradwatch makes its float64 copy) fails: every check would be an "error". LSTM weights are
planted by an equivalent class swap (`plant_rnn_row_bug`) whose forward hands
`nn.LSTM.forward` the bugged weight through the same identity-forward, row-scaling-backward
function and restores `_flat_weights` afterwards. Every planting is verified before it is
used: same loss, row 1 of the gradient x1.5, other rows unchanged. A run trains until the
first alert, or for `--after` checks (default 5) past the bug.

Clean twins. Each architecture also trains without a bug for `--clean-checks` checks (default
300, i.e. 3000 steps), counting the checks that warn, alert or error. Before its runs, each
architecture trains through 3 checks once, unreported, so that first-call costs in the process
(code paths, allocator) do not land on the first measured run.

The table (stdout, markdown; progress goes to stderr) has one row per architecture and bug
position plus one clean row per architecture. Summaries of every check that missed, blamed
another tensor, or warned/alerted/errored on a clean model go to `--failures`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradwatch import CheckReport, GradWatch
from gradwatch.watch.budget import MINIMUM
from tests.support.hf_zoo import RowBugFn, plant_row_bug

EVERY = 10
OVERHEAD = 0.5  # x EVERY = 5 training steps per check: what overhead=0.005 gives every=1000
DEFAULT_OVERHEAD = 0.005
ROW, FACTOR = 1, 1.5
VOCAB = 256
LONGEST = 32  # tokens in the longest sequence of a text batch (specials included)
SHORTER_BY = (0, 3, 5, 8)  # the other sequences are this many tokens shorter
TEXT_BATCH = 8
IMAGE_BATCH = 16
DATASET = 64  # fixed batches per architecture, cycled
LR = 1e-3

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ synthetic data
def bigram_chain(seed: int, size: int = VOCAB, low: int = 5) -> Tensor:
    """A fixed random bigram transition matrix over tokens `low..size-2`: peaked rows, so the
    next token is learnable (ids below `low` and the last id are left for special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(size, size, generator=generator)
    logits[:, :low] = -torch.inf
    logits[:, size - 1] = -torch.inf
    return torch.softmax(logits, dim=1)


def sample_chain(chain: Tensor, length: int, generator: torch.Generator, low: int = 5
                 ) -> list[int]:
    token = int(torch.randint(low, chain.shape[0] - 1, (), generator=generator))
    tokens = [token]
    for _ in range(length - 1):
        token = int(torch.multinomial(chain[token], 1, generator=generator))
        tokens.append(token)
    return tokens


def lengths(generator: torch.Generator, count: int) -> list[int]:
    """`count` lengths LONGEST - SHORTER_BY[i], each offset equally often, shuffled."""
    offsets = [SHORTER_BY[i % len(SHORTER_BY)] for i in range(count)]
    order = torch.randperm(count, generator=generator).tolist()
    return [LONGEST - offsets[i] for i in order]


def causal_lm_batches(count: int, seed: int) -> list[dict[str, Tensor]]:
    """GPT-2 batches: bigram text + <|endoftext|> (the last id, also the pad id), right-padded
    as DataCollatorForLanguageModeling(mlm=False) pads them: attention_mask 0 on pads, labels
    = input_ids with every pad-id position -100 (the real eos too, as the collator does)."""
    chain, generator = bigram_chain(seed), torch.Generator().manual_seed(seed + 1)
    eos = VOCAB - 1
    batches = []
    for _ in range(count):
        rows = [[*sample_chain(chain, n - 1, generator), eos]
                for n in lengths(generator, TEXT_BATCH)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), eos)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": ids.masked_fill(ids == eos, -100)})
    return batches


BERT_PAD, BERT_CLS, BERT_SEP, BERT_MASK = 0, 2, 3, 4


def masked_lm_batches(count: int, seed: int) -> list[dict[str, Tensor]]:
    """BERT batches: [CLS] bigram text [SEP], [PAD]-padded on the right, 15% of the ordinary
    tokens selected (at least one per batch) as DataCollatorForLanguageModeling(mlm=True)
    selects them: 80% -> [MASK], 10% -> a random token, 10% kept; labels -100 elsewhere."""
    chain, generator = bigram_chain(seed), torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        rows = [[BERT_CLS, *sample_chain(chain, n - 2, generator), BERT_SEP]
                for n in lengths(generator, TEXT_BATCH)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), BERT_PAD)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        ordinary = ids >= 5
        selected = torch.zeros_like(ordinary)
        while not selected.any():
            selected = (torch.rand(ids.shape, generator=generator) < 0.15) & ordinary
        labels = ids.masked_fill(~selected, -100)
        draw = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[selected & (draw < 0.8)] = BERT_MASK
        swap = selected & (draw >= 0.8) & (draw < 0.9)
        inputs[swap] = torch.randint(5, VOCAB, (int(swap.sum()),), generator=generator)
        batches.append({"input_ids": inputs, "attention_mask": mask,
                        "token_type_ids": torch.zeros_like(ids), "labels": labels})
    return batches


def image_batches(count: int, seed: int, classes: int = 10) -> list[tuple[Tensor, Tensor]]:
    """Random 3x32x32 images labelled by a fixed random linear teacher of the 8x8-pooled image."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3 * 8 * 8, classes, generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(IMAGE_BATCH, 3, 32, 32, generator=generator)
        y = (F.avg_pool2d(x, 4).flatten(1) @ teacher).argmax(dim=1)
        batches.append((x, y))
    return batches


def next_token_batches(count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """LSTM batches: bigram sequences of LONGEST tokens, inputs x[:-1], targets x[1:]."""
    chain, generator = bigram_chain(seed), torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        ids = torch.tensor([sample_chain(chain, LONGEST + 1, generator)
                            for _ in range(TEXT_BATCH)])
        batches.append((ids[:, :-1], ids[:, 1:]))
    return batches


# ------------------------------------------------------------------ models
def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


#: Eager attention, as in tests/hf_zoo (torch.func.vmap has no batching rule for SDPA).
EAGER: dict[str, Any] = {"attn_implementation": "eager"}


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=LONGEST, n_embd=64, n_layer=4, n_head=4,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **EAGER)
    return seeded(0, lambda: GPT2LMHeadModel(config))


def build_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, pad_token_id=BERT_PAD, **EAGER)
    return seeded(0, lambda: BertForMaskedLM(config))


class ConvNet(nn.Module):
    """Three conv 3x3 / BatchNorm / ReLU / maxpool 2 blocks (3 -> 16 -> 32 -> 64 channels,
    32x32 -> 4x4) and a linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for fan_in, fan_out in ((3, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.BatchNorm2d(fan_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x).flatten(1))
        return out


class LSTMLanguageModel(nn.Module):
    """Embedding 64, a 2-layer LSTM of width 128, LayerNorm, a linear decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 64)
        self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(128)
        self.decoder = nn.Linear(128, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embedding(ids))
        out: Tensor = self.decoder(self.norm(hidden))
        return out


def hf_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    loss: Tensor = model(**batch).loss
    return loss


def image_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def next_token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


@dataclass(frozen=True)
class Architecture:
    """A model, its fixed dataset, its loss and the early/middle/late tensors to plant bugs in.
    `watch_loss` is what GradWatch gets (None: the HF model's own `.loss`)."""

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[int], list[Any]]
    loss_fn: LossFn
    watch_loss: LossFn | None
    bugs: tuple[str, str, str]


ARCHITECTURES = (
    Architecture("GPT-2", build_gpt2, lambda n: causal_lm_batches(n, 1), hf_loss, None,
                 ("transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_fc.weight",
                  "transformer.h.3.mlp.c_proj.weight")),
    Architecture("BERT", build_bert, lambda n: masked_lm_batches(n, 2), hf_loss, None,
                 ("bert.encoder.layer.0.attention.self.query.weight",
                  "bert.encoder.layer.2.intermediate.dense.weight",
                  "bert.encoder.layer.3.output.dense.weight")),
    Architecture("CNN", lambda: seeded(0, ConvNet), lambda n: image_batches(n, 3), image_loss,
                 image_loss, ("features.0.weight", "features.4.weight", "head.weight")),
    Architecture("LSTM", lambda: seeded(0, LSTMLanguageModel),
                 lambda n: next_token_batches(n, 4), next_token_loss, next_token_loss,
                 ("lstm.weight_ih_l0", "lstm.weight_hh_l1", "decoder.weight")),
)


# ------------------------------------------------------------------ planting bugs
_RNN_BUGS = "_bench_rnn_row_bugs"
_RNN_CLASSES: dict[type[nn.RNNBase], type[nn.RNNBase]] = {}


def _rnn_bug_class(base: type[nn.RNNBase]) -> type[nn.RNNBase]:
    """A subclass of an `nn.RNNBase` class (same name) whose forward runs the base forward with
    the bugged entries of `_flat_weights` passed through `RowBugFn`."""
    if base in _RNN_CLASSES.values():
        return base
    cls = _RNN_CLASSES.get(base)
    if cls is None:
        base_forward = base.forward

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            bugs = self.__dict__.get(_RNN_BUGS)
            if not bugs:
                return base_forward(self, *args, **kwargs)
            flat = self._flat_weights  # read now: deepcopy, .double(), functional_call reset it
            self._flat_weights = [
                RowBugFn.apply(weight, *bugs[name]) if name in bugs and weight is not None
                else weight
                for name, weight in zip(self._flat_weights_names, flat)
            ]
            try:
                return base_forward(self, *args, **kwargs)
            finally:
                self._flat_weights = flat

        cls = cast(type[nn.RNNBase], type(
            base.__name__, (base,),
            {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__},
        ))
        _RNN_CLASSES[base] = cls
    return cls


def plant_rnn_row_bug(model: nn.Module, param_name: str, row: int = ROW,
                      factor: float = FACTOR) -> None:
    """`plant_row_bug` for the weights of an `nn.RNN`/`nn.LSTM`/`nn.GRU` (class swap; the
    forward is bit-identical, row `row` of the parameter's gradient is x `factor`)."""
    module_name, _, short = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, nn.RNNBase) or short not in module._flat_weights_names:
        raise KeyError(f"{param_name!r} is not a weight of an nn.RNNBase module")
    bugs = dict(module.__dict__.get(_RNN_BUGS) or {})
    bugs[short] = (row, float(factor))
    module.__dict__[_RNN_BUGS] = bugs
    module.__class__ = _rnn_bug_class(type(module))


def plant(model: nn.Module, param_name: str) -> None:
    owner = model.get_submodule(param_name.rpartition(".")[0])
    if isinstance(owner, nn.RNNBase):
        plant_rnn_row_bug(model, param_name)
    else:
        plant_row_bug(model, param_name, row=ROW, factor=FACTOR)


def verify_plant(model: nn.Module, param_name: str, batch: Batch, loss_fn: LossFn) -> None:
    """Plant the bug in a copy of `model` and make sure it does what it says: the same loss,
    row ROW of the gradient x FACTOR, every other gradient unchanged."""

    def loss_and_grads(module: nn.Module) -> tuple[float, dict[str, Tensor]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module.eval()  # no dropout: the two passes must see the same function
            loss = loss_fn(module, batch)
            named = {n: p for n, p in module.named_parameters() if p.requires_grad}
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        return loss.item(), {n: g for n, g in zip(named, grads) if g is not None}

    clean_loss, clean = loss_and_grads(copy.deepcopy(model))
    buggy_model = copy.deepcopy(model)
    plant(buggy_model, param_name)
    buggy_loss, buggy = loss_and_grads(buggy_model)
    expected = dict(clean)
    expected[param_name] = clean[param_name].clone()
    expected[param_name][ROW] *= FACTOR
    wrong = [n for n in clean if not torch.allclose(buggy[n], expected[n], rtol=1e-5,
                                                    atol=1e-7)]
    if buggy_loss != clean_loss or wrong or torch.equal(clean[param_name], buggy[param_name]):
        raise AssertionError(f"planting {param_name} did not work: loss {clean_loss} -> "
                             f"{buggy_loss}, gradients wrong for {wrong}")


# ------------------------------------------------------------------ training
@dataclass
class Run:
    """One training run: the checks it made, the training seconds per step between checks."""

    reports: list[CheckReport] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    steps: int = 0


def train(arch: Architecture, batches: list[Any], *, max_checks: int, bug: str | None = None,
          plant_at: int = 15, after: int = 5) -> Run:
    """Train `arch` with Adam and GradWatch(every=EVERY, overhead=OVERHEAD) until `max_checks`
    checks (clean) or, with a bug planted after step `plant_at`, until the first alert or
    `after` checks past the bug."""
    torch.manual_seed(0)  # dropout streams: the same in every run of an architecture
    model = arch.build()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    watch = GradWatch(every=EVERY, overhead=OVERHEAD, loss_fn=arch.watch_loss, mlflow=False,
                      report=False)
    run = Run()
    since, last = time.perf_counter(), 0
    after_bug = 0
    step = 0
    while True:
        step += 1
        batch = batches[step % len(batches)]
        loss = arch.loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained = time.perf_counter()
        report = watch.step(model, batch, step=step)
        if bug is not None and step == plant_at:
            plant(model, bug)
        if report is None:
            continue
        if last:  # the training seconds per step since the last check
            run.step_seconds.append((trained - since) / (step - last))
        since, last = time.perf_counter(), step
        run.reports.append(report)
        if bug is None:
            if len(run.reports) >= max_checks:
                break
            continue
        if step > plant_at:
            after_bug += 1
            if report.verdict == "alert" or after_bug >= after:
                break
    run.steps = step
    watch.close()
    return run


# ------------------------------------------------------------------ the table
@dataclass
class Row:
    arch: str
    tensors: int
    bug: str  # "clean" for a clean twin
    until: int | None = None  # checks after the bug until the alert; None: none within `after`
    blamed: str = ""
    right: bool | None = None
    evaluations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    screened: list[int] = field(default_factory=list)
    alerting: CheckReport | None = None
    allowed: float = 0.0
    counts: tuple[int, int, int] = (0, 0, 0)  # clean warns, alerts, errors
    checks: int = 0


def steady(reports: Sequence[CheckReport]) -> list[CheckReport]:
    """The checks after the one at the first step (first_step=True: a one-off larger budget)."""
    return [r for r in reports if int(str(r.probe.get("step", 0))) > 1]


def fill(row: Row, reports: Sequence[CheckReport], step_seconds: Sequence[float]) -> None:
    kept = steady(reports)
    row.evaluations = [r.evaluations for r in kept]
    row.seconds = [r.seconds for r in kept]
    row.budgets = [int(str(r.probe.get("budget", 0))) for r in kept]
    row.screened = [r.coverage.get("screened", 0) for r in kept]
    row.allowed = OVERHEAD * EVERY * statistics.median(step_seconds) if step_seconds else 0.0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def note(failures: list[str], title: str, report: CheckReport) -> None:
    failures.append(f"=== {title}\n{report.summary()}\n")


def bug_row(arch: Architecture, tensors: int, batches: list[Any], bug: str, plant_at: int,
            after: int, failures: list[str]) -> Row:
    run = train(arch, batches, max_checks=0, bug=bug, plant_at=plant_at, after=after)
    row = Row(arch.name, tensors, bug)
    fill(row, run.reports, run.step_seconds)
    before = [r for r in run.reports if int(str(r.probe["step"])) <= plant_at]
    past = [r for r in run.reports if int(str(r.probe["step"])) > plant_at]
    for report in before:
        if report.verdict != "ok":
            note(failures, f"{arch.name} {bug}: {report.verdict} at step {report.probe['step']}"
                           f" BEFORE the bug was planted", report)
    for index, report in enumerate(past, 1):
        if report.verdict == "alert":
            row.until, row.alerting = index, report
            row.blamed = report.worst_layers(1)[0][0]
            row.right = row.blamed == bug
            if not row.right:
                note(failures, f"{arch.name} {bug}: alert at step {report.probe['step']} blames "
                               f"{row.blamed}", report)
            break
        note(failures, f"{arch.name} {bug}: {report.verdict}, no alert at step "
                       f"{report.probe['step']} (check {index} after the bug)", report)
    return row


def clean_row(arch: Architecture, tensors: int, batches: list[Any], checks: int,
              failures: list[str]) -> Row:
    run = train(arch, batches, max_checks=checks)
    row = Row(arch.name, tensors, "clean", checks=len(run.reports))
    fill(row, run.reports, run.step_seconds)
    verdicts = [r.verdict for r in run.reports]
    row.counts = (verdicts.count("warn"), verdicts.count("alert"), verdicts.count("error"))
    for report in run.reports:
        if report.verdict != "ok":
            note(failures, f"{arch.name} clean: {report.verdict} at step {report.probe['step']}",
                 report)
    return row


def short(name: str) -> str:
    for prefix in ("transformer.", "bert.encoder.", "features."):
        name = name.removeprefix(prefix)
    return name


def render(rows: Sequence[Row], after: int, plant_at: int, clean_checks: int,
           elapsed: float, blas: str) -> str:
    header = ("| architecture | tensors | bug tensor | checks until alert | right tensor blamed "
              "| evaluations/check (median; alerting) | seconds/check (median; alerting) "
              "| allowed s/check | budget (median; alerting) | tensors screened/check "
              "| clean warns/alerts/errors |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        alerting = row.alerting
        if row.bug == "clean":
            until, right = "-", "-"
            evaluations = f"{median(row.evaluations):g}"
            seconds = f"{median(row.seconds):.3f}"
            budget = f"{median(row.budgets):g}"
            screened = f"{median(row.screened):g}/{row.tensors}"
            counts = f"{'/'.join(map(str, row.counts))} over {row.checks} checks"
        else:
            until = str(row.until) if row.until is not None else f"MISS (>{after})"
            right = ("yes" if row.right else f"NO: {short(row.blamed)}") if alerting else "-"
            evaluations = f"{median(row.evaluations):g}; " + (
                f"{alerting.evaluations}" if alerting else "-")
            seconds = f"{median(row.seconds):.3f}; " + (
                f"{alerting.seconds:.3f}" if alerting else "-")
            budget = f"{median(row.budgets):g}; " + (
                f"{alerting.probe.get('budget')}" if alerting else "-")
            screened = (f"{alerting.coverage.get('screened', 0)}" if alerting
                        else f"{median(row.screened):g}") + f"/{row.tensors}"
            counts = "-"
        lines.append(f"| {row.arch} | {row.tensors} | {short(row.bug)} | {until} | {right} "
                     f"| {evaluations} | {seconds} | {row.allowed:.3f} | {budget} | {screened} "
                     f"| {counts} |")
    bugs = [r for r in rows if r.bug != "clean"]
    clean = [r for r in rows if r.bug == "clean"]
    first = sum(r.until == 1 for r in bugs)
    two = sum(r.until is not None and r.until <= 2 for r in bugs)
    right_count = sum(bool(r.right) for r in bugs)
    warns, alerts, errors = (sum(r.counts[i] for r in clean) for i in range(3))
    total = sum(r.checks for r in clean)
    ratios = {r.arch: median(r.seconds) / r.allowed for r in clean if r.allowed > 0}
    costs = ", ".join(f"{arch} {ratio:.1f}x (~{DEFAULT_OVERHEAD * ratio:.1%})"
                      for arch, ratio in ratios.items())
    floor = sum(b <= MINIMUM for r in clean for b in r.budgets)
    lines += [
        "",
        f"Summary: {first}/{len(bugs)} bugs ({first / len(bugs):.0%}) alert at the first check "
        f"after they appear, {two}/{len(bugs)} ({two / len(bugs):.0%}) within two, "
        f"{right_count}/{len(bugs)} ({right_count / len(bugs):.0%}) blame the right tensor; "
        f"clean twins: {warns} warns, {alerts} alerts, {errors} errors over {total} checks.",
        f"Cost: a clean check's median seconds / its allowance (and so the share of training "
        f"time at every=1000, overhead=0.005): {costs}; budget at its floor ({MINIMUM} "
        f"evaluations) in {floor} of {sum(len(r.budgets) for r in clean)} clean checks.",
        "",
        f"Budget: GradWatch(every={EVERY}, overhead={OVERHEAD}) gives each check "
        f"{OVERHEAD} x {EVERY} = {OVERHEAD * EVERY:g} training steps of time, what the default "
        f"overhead=0.005 gives at every=1000 (0.005 x 1000); allowed s/check = that, from the "
        f"run's measured seconds per training step. first_step=True, probe_rows=8, mode auto.",
        f"Bugs: row {ROW} of the tensor's gradient x{FACTOR} (forward unchanged), planted after "
        f"step {plant_at} (checks at steps 1 and {EVERY} before it); a run stops at the first "
        f"alert or {after} checks after the bug. 'checks until alert' 1 = the first check after "
        f"the bug; 'right tensor blamed' = report.worst_layers(1) of the alerting check.",
        f"Medians are over the run's checks after the first-step one (its budget is a fixed "
        f"one-off); budget = report.probe['budget'] (loss evaluations; localisation may go "
        f"over it); screened = report.coverage['screened']. Clean twins: {clean_checks} checks "
        f"({clean_checks * EVERY} steps) each. torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, numpy BLAS {blas} threads; whole run "
        f"{elapsed / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer clean checks (smoke run)")
    parser.add_argument("--clean-checks", type=int, default=None,
                        help="checks per clean twin (default 300, --quick 8)")
    parser.add_argument("--after", type=int, default=5, help="checks after the bug, at most")
    parser.add_argument("--plant-at", type=int, default=15, help="the step after which the "
                        "bug is planted")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="numpy BLAS threads (threadpoolctl; default 1, 0: as numpy starts)")
    parser.add_argument("--only", default=None, help="comma-separated architectures")
    parser.add_argument("--failures", type=Path, default=Path("/tmp/bench_detect_failures.txt"),
                        help="where the summaries of misses and false warnings go")
    args = parser.parse_args(argv)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # alerts are expected
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # GPT-2's loss_type notice
    torch.set_num_threads(args.threads)
    return run_all(args)


def blas_limit(threads: int) -> contextlib.AbstractContextManager[Any]:
    """Limit the BLAS libraries loaded so far (numpy's OpenBLAS, which gradwatch's engine
    uses) to `threads` threads; 0: leave them as they start."""
    if threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads, user_api="blas")


def numpy_blas_threads() -> str:
    """The thread count of numpy's BLAS now (\"?\" without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "?"
    counts = {str(i["num_threads"]) for i in threadpool_info()
              if i["user_api"] == "blas" and "numpy" in i["filepath"]}
    return "/".join(sorted(counts)) or "?"


def arch_rows(arch: Architecture, model: nn.Module, batches: list[Any],
              args: argparse.Namespace, clean_checks: int, failures: list[str]) -> list[Row]:
    """The three bug rows and the clean row of one architecture."""
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    for bug in arch.bugs:
        verify_plant(model, bug, batches[0], arch.loss_fn)
    progress(f"{arch.name}: warm-up run, 3 checks (not reported)")
    train(arch, batches, max_checks=3)  # first-call costs of this model's code paths
    rows = []
    for bug in arch.bugs:
        progress(f"{arch.name}: bug in {bug}")
        row = bug_row(arch, tensors, batches, bug, args.plant_at, args.after, failures)
        rows.append(row)
        progress(f"{arch.name}: {bug}: alert after {row.until} check(s), blamed "
                 f"{row.blamed or '-'}")
    progress(f"{arch.name}: clean twin, {clean_checks} checks")
    row = clean_row(arch, tensors, batches, clean_checks, failures)
    rows.append(row)
    progress(f"{arch.name}: clean: warns/alerts/errors {row.counts} over {row.checks}")
    return rows


def run_all(args: argparse.Namespace) -> int:
    clean_checks = args.clean_checks or (8 if args.quick else 300)
    wanted = {n.strip().lower() for n in args.only.split(",")} if args.only else None
    started = time.perf_counter()
    rows: list[Row] = []
    failures: list[str] = []
    blas = "?"
    for arch in ARCHITECTURES:
        if wanted is not None and arch.name.lower() not in wanted:
            continue
        batches = arch.batches(DATASET)
        model = arch.build()
        with blas_limit(args.blas_threads):  # after the imports that load BLAS libraries
            blas = numpy_blas_threads()
            rows += arch_rows(arch, model, batches, args, clean_checks, failures)
    table = render(rows, args.after, args.plant_at, clean_checks,
                   time.perf_counter() - started, blas)
    args.failures.write_text("\n".join(failures) if failures else "no failures\n")
    progress(f"{len(failures)} failing check(s) summarised in {args.failures}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

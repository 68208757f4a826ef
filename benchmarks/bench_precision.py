"""The training-kernels measurement on planted kernel faults and their clean twins, in one run.

    python benchmarks/bench_precision.py            # 5 checks per case (~1.5 minutes on 2 cores)
    python benchmarks/bench_precision.py --checks 2 # a smoke test
    python benchmarks/bench_precision.py --zoo      # also: the 15 clean HF models (~5 minutes)

Each fault lives only where a float64 check cannot see it — the float64 path is right, the
path training runs (float32, bf16, a compiled graph) is wrong, as with a fused kernel whose
wrapper falls back to a reference implementation for float64:

* a `torch.library` custom op whose backward is 1% off outside float64 (float32 training,
  eager and under `torch.compile` with inductor on the CPU);
* a `torch.autograd.Function` whose backward to its input is 1.5× too large outside float64,
  under bf16 autocast and with bf16 parameters;
* the same fault after layer 0's MLP of a tiny LLaMA (SDPA attention, RMSNorm, rotary) from
  a `transformers` config, under bf16 autocast, with HF-collated right-padded batches.

The last pair plants nothing: a grouped `nn.Conv1d` (32 channels, 4 groups, kernel 8, the
shape of wav2vec2's positional convolution) under bf16 autocast, whose CPU kernel in PyTorch
2.13's oneDNN returns an output unrelated to the right one on AVX512-BF16/AMX CPUs; its twin
has groups=1. The script prints that kernel's own error on this machine first (~1e-3 right,
~0.7 broken), so the row's expected verdict is known.

Every case has a clean twin (the correct op, no fault). Each row runs `--checks` checks of
`gradwatch.check_module` on different probe batches and prints the verdicts of both
measurements ("definition": central differences on float64; "kernels": the training
precision), the largest ratio, the layers the kernels measurement flagged, and the seconds per
check (the central-difference part and the kernels part; the first check of a compiled model
includes compiling its eval graph). A fault row must read "alert" with the faulty layer
flagged and "ok" by definition; a clean row must read "ok".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradwatch
from tests.support.hf_zoo import make_zoo
from tests.support.kernel_faults import (
    CleanNet,
    FaultyScaleNet,
    FaultyTanhNet,
    GroupedConvNet,
    grouped_conv_batch,
    grouped_conv_bf16_error,
    mse,
    mse_float,
    plant_kernel_fault,
)


@dataclass
class Case:
    name: str
    precision: str
    build: Callable[[], tuple[Any, Any]]  # → (model to check, loss_fn or None)
    batch: Callable[[int], Any]
    autocast: bool = False
    warm: Callable[[Any, Any, Any], None] | None = None  # a training step before checking


def _mlp_batch(features: int, dtype: torch.dtype = torch.float32) -> Callable[[int], Any]:
    def batch(seed: int) -> Any:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(16, features, generator=generator)
        y = torch.randn(16, 1, generator=generator)
        return x.to(dtype), y.to(dtype)

    return batch


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        torch.manual_seed(0)
        return make(), mse

    return build


def _compiled(clean: bool) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        torch.manual_seed(0)
        return torch.compile(FaultyTanhNet(clean=clean)), mse

    return build


def _train_step(model: Any, loss_fn: Any, batch: Any) -> None:
    loss_fn(model, batch).backward()  # compiles the training graph, as training would
    for parameter in model.parameters():
        parameter.grad = None


def _llama(fault: bool) -> tuple[Callable[[], tuple[Any, Any]], Callable[[int], Any]]:
    entry = make_zoo("sdpa")["llama"]

    def build() -> tuple[Any, Any]:
        model = entry.build()
        if fault:
            plant_kernel_fault(model.get_submodule("model.layers.0.mlp"))
        return model, None

    return build, entry.batch


def cases() -> list[Case]:
    llama_fault, llama_batch = _llama(True)
    llama_clean, _ = _llama(False)
    bf16 = torch.bfloat16
    return [
        Case("custom op, backward 1% off", "float32", _seeded(FaultyTanhNet), _mlp_batch(4)),
        Case("  clean twin", "float32", _seeded(lambda: FaultyTanhNet(clean=True)),
             _mlp_batch(4)),
        Case("custom op, 1% off, compiled", "float32 compiled", _compiled(False),
             _mlp_batch(4), warm=_train_step),
        Case("  clean twin", "float32 compiled", _compiled(True), _mlp_batch(4),
             warm=_train_step),
        Case("autograd.Function, 1.5× dx", "bf16 autocast", _seeded(FaultyScaleNet),
             _mlp_batch(8), autocast=True),
        Case("  clean twin", "bf16 autocast", _seeded(CleanNet), _mlp_batch(8), autocast=True),
        Case("autograd.Function, 1.5× dx", "bf16 parameters",
             _seeded(lambda: FaultyScaleNet().to(bf16)), _mlp_batch(8, bf16)),
        Case("  clean twin", "bf16 parameters", _seeded(lambda: CleanNet().to(bf16)),
             _mlp_batch(8, bf16)),
        Case("LLaMA, fault after layer 0 MLP", "bf16 autocast", llama_fault, llama_batch,
             autocast=True),
        Case("  clean twin", "bf16 autocast", llama_clean, llama_batch, autocast=True),
        Case("grouped Conv1d, PyTorch's kernel", "bf16 autocast",
             lambda: (_seed_then(GroupedConvNet), mse_float), grouped_conv_batch, autocast=True),
        Case("  groups=1 twin", "bf16 autocast",
             lambda: (_seed_then(lambda: GroupedConvNet(groups=1)), mse_float),
             grouped_conv_batch, autocast=True),
    ]


def _seed_then(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make()


@contextlib.contextmanager
def _autocast(enabled: bool) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        yield


def run(case: Case, checks: int) -> list[str]:
    model, loss_fn = case.build()
    if case.warm is not None:
        with _autocast(case.autocast):
            case.warm(model, loss_fn, case.batch(0))
    definition: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    ratios, check_seconds, kernel_seconds = [], [], []
    for seed in range(1, checks + 1):
        with _autocast(case.autocast):
            report = gradwatch.check_module(model, case.batch(seed), loss_fn, budget=200,
                                            seed=seed)
        assert report.kernels is not None
        definition[report.definition_verdict or report.verdict] += 1
        kernels[str(report.kernels.verdict)] += 1
        ratios.append(report.kernels.ratio)
        for name, layer in report.kernels.layers.items():
            if layer.verdict != "ok":
                flagged[name] += 1
        check_seconds.append(report.seconds)
        kernel_seconds.append(report.kernels.seconds)
    top = ", ".join(f"{name} ({count})" for name, count in flagged.most_common(3)) or "-"
    return [case.name, case.precision, _counts(kernels), _counts(definition),
            f"{max(ratios):.3g}", top, f"{statistics.median(check_seconds):.3f}",
            f"{statistics.median(kernel_seconds):.3f}"]


def _bf16_batch(batch: Any) -> Any:
    return {key: value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point()
            else value for key, value in batch.items()}


def zoo_rows(checks: int) -> list[list[str]]:
    """The clean HF zoo at bf16: per model, attention and precision, the largest ratio."""
    rows = []
    for attention in ("eager", "sdpa"):
        for name, entry in make_zoo(attention).items():
            for precision in ("bf16 autocast", "bf16 parameters"):
                print(f"... {name} {attention} ({precision})", file=sys.stderr, flush=True)
                model = entry.build()
                params = precision == "bf16 parameters"
                if params:
                    model = model.to(torch.bfloat16)
                verdicts: Counter[str] = Counter()
                worst = (-1.0, "-")
                for seed in range(1, checks + 1):
                    batch = entry.batch(seed)
                    with _autocast(not params):
                        report = gradwatch.check_module(
                            model, _bf16_batch(batch) if params else batch, None, budget=12,
                            seed=seed)
                    assert report.kernels is not None
                    verdicts[str(report.kernels.verdict)] += 1
                    for tensor, layer in report.kernels.layers.items():
                        if layer.ratio > worst[0]:
                            worst = (layer.ratio, tensor)
                rows.append([name, attention, precision, _counts(verdicts), f"{worst[0]:.3g}",
                             worst[1]])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def _counts(counter: Counter[str]) -> str:
    return " ".join(f"{verdict} {count}" for verdict, count in sorted(counter.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=5, help="checks per case (default 5)")
    parser.add_argument("--zoo", action="store_true",
                        help="also the clean HF zoo at bf16 (the thresholds' calibration)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # transformers' and inductor's notices
    header = ["case", "training precision", "kernels", "definition", "max ratio",
              "flagged layers (checks)", "check s", "kernels s"]
    rows = []
    for case in cases():
        print(f"... {case.name.strip()} ({case.precision})", file=sys.stderr, flush=True)
        rows.append(run(case, args.checks))
    print(f"this machine's bf16 grouped conv1d kernel: distance from float64 "
          f"{grouped_conv_bf16_error():.3g} (groups=1: {grouped_conv_bf16_error(1):.3g})")
    print(f"{args.checks} checks per case; thresholds: ratio warn "
          f"{gradwatch.RatioThresholds().warn:g}, alert {gradwatch.RatioThresholds().alert:g}")
    _table(header, rows)
    if args.zoo:
        zoo = zoo_rows(args.checks)
        print(f"\nclean HF zoo, {args.checks} checks per row (budget 12)")
        _table(["model", "attention", "training precision", "kernels", "max ratio",
                "at tensor"], zoo)


if __name__ == "__main__":
    main()

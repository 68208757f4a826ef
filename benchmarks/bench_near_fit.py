"""Verdicts on correct models where checks are hardest — near a fit, beside ReLU kinks. One run.

    python benchmarks/bench_near_fit.py             # ~40 s on 2 shared CPU cores
    python benchmarks/bench_near_fit.py --checks 10 # a smoke run

Four tables (markdown on stdout, progress on stderr), every model from
`tests/support/near_fit.py`, every check `gradwatch.check_module(..., budget=10)` on a
different seed (the screen's directions), as `GradWatch(every=1000)` spends it:

1. A CNN (conv/BatchNorm/ReLU/max-pool) trained with Adam on one batch of 8 images for 300,
   600 and 1,000 steps (loss 1e-3 → 1e-6): the verdicts of `--checks` checks each, with
   `loss_scale=2.3` (what GradWatch passes: its first check's loss). Nothing is wrong with the
   model: "alert"/"warn" are false alarms, "error" must say why (not "float64 precision was
   lost": float64 holds).
2. An MLP whose 512 ReLU inputs on one row sit within `offset` of 0 (1e-10 … 1e-4): the
   verdicts of the correct model, and of the same model with row 1 of its head's weight
   reported ×1.5 (a one-row backward bug, `tests/support/hf_zoo.plant_row_bug`; training
   kernels off, since the bug's custom op would have them measured): the share of checks that
   alert on the head.
3. A small MLP with a correct custom autograd op (so the training-kernels measurement runs)
   memorising its batch under cross-entropy: the training-kernels verdict and ratio as the
   loss falls (a correct model: ratio ≈ 1–3 is right; warn is 12, alert 32).
4. The HF zoo's LLaMA, BERT and T5 (`tests/support/hf_zoo.py`, from configs, their own losses)
   with layer 0's MLP output passed through that correct custom op, trained in float32 with
   Adam (lr 3e-3, dropout on) on one batch: both verdicts after 0, 100 and 300 steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, run from anywhere

import torch

import gradwatch
from gradwatch.engine.assess import NOT_SMOOTH
from tests.support.hf_zoo import make_zoo, plant_row_bug
from tests.support.near_fit import (
    beside_kinks,
    ce,
    fitted_cnn,
    memorising_net,
    pass_through_identity_op,
)
from tests.support.torch_models import seeded

OFFSETS = (1e-10, 1e-8, 1e-6, 1e-4)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def kind(report: gradwatch.CheckReport) -> str:
    """A verdict, and for an error which one."""
    if report.verdict != "error":
        return report.verdict
    reason = report.reasons[0] if report.reasons else ""
    for start, name in ((NOT_SMOOTH, "error: kinks"),
                        ("error: float64 precision was lost", "error: float64 lost"),
                        ("error: the check could not resolve", "error: too flat"),
                        ("error: the joint screen's discrepancy", "error: unreproduced")):
        if reason.startswith(start):
            return name
    return "error: other"


def counts(kinds: list[str]) -> str:
    found = Counter(kinds)
    return ", ".join(f"{name} {found[name]}" for name in sorted(found))


def cnn_table(checks: int) -> list[str]:
    lines = ["| CNN trained on its batch | loss | verdicts | evaluations (median) |",
             "|---|---:|---|---:|"]
    for steps in (300, 600, 1000):
        progress(f"CNN after {steps} steps: {checks} checks")
        model, batch = fitted_cnn(steps)
        reports = [gradwatch.check_module(model, batch, ce, seed=seed, budget=10,
                                          loss_scale=2.3) for seed in range(checks)]
        evaluations = sorted(r.evaluations for r in reports)[len(reports) // 2]
        lines.append(f"| {steps} Adam steps | {reports[0].loss:.1e} | "
                     f"{counts([kind(r) for r in reports])} | {evaluations} |")
    return lines


def kinks_table(checks: int) -> list[str]:
    lines = ["| ReLU inputs within | correct model | row bug in the head: alerts on it |",
             "|---|---|---:|"]
    off = gradwatch.CheckOptions(kernels="off")
    for offset in OFFSETS:
        progress(f"MLP beside kinks, offset {offset:g}: {checks} + {checks} checks")
        model, batch = beside_kinks(offset)
        clean = [kind(gradwatch.check_module(model, batch, ce, seed=seed, budget=10))
                 for seed in range(checks)]
        plant_row_bug(model, "4.weight")
        found = 0
        for seed in range(checks):
            report = gradwatch.check_module(model, batch, ce, seed=seed, budget=10, options=off)
            found += report.verdict == "alert" and report.worst_layers(1)[0][0] == "4.weight"
        lines.append(f"| {offset:g} | {counts(clean)} | {found}/{checks} |")
    return lines


def kernels_table() -> list[str]:
    lines = ["| memorising cross-entropy, Adam steps | loss | kernels verdict | ratio |",
             "|---|---:|---|---:|"]
    for steps in (0, 50, 200, 400, 800):
        progress(f"memorising MLP after {steps} steps")
        model, batch, objective = memorising_net("cross_entropy", steps=steps)
        report = gradwatch.check_module(model, batch, objective, budget=10)
        kernels = report.kernels
        verdict = kernels.verdict if kernels is not None else "-"
        ratio = f"{kernels.ratio:.3g}" if kernels is not None and kernels.ratio else "-"
        lines.append(f"| {steps} | {report.loss:.1e} | {verdict} | {ratio} |")
    return lines


def zoo_table() -> list[str]:
    lines = ["| model, Adam steps on one batch | loss | verdict | kernels verdict | ratio |",
             "|---|---:|---|---|---:|"]
    zoo = make_zoo()
    for name in ("llama", "bert", "t5"):
        entry = zoo[name]
        with seeded(0):
            model, batch = entry.build(), entry.batch(0)
            pass_through_identity_op(model.get_submodule(entry.targets[1].rsplit(".", 2)[0]))
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
            done = 0
            for steps in (0, 100, 300):
                progress(f"{name} with a custom op after {steps} steps")
                for _ in range(steps - done):
                    optimizer.zero_grad()
                    model(**batch).loss.backward()
                    optimizer.step()
                done = steps
                report = gradwatch.check_module(model, batch, budget=12)
                kernels = report.kernels
                verdict = kernels.verdict if kernels is not None else "-"
                ratio = f"{kernels.ratio:.3g}" if kernels is not None and kernels.ratio else "-"
                lines.append(f"| {name}, {steps} | {report.loss:.1e} | {report.verdict} | "
                             f"{verdict} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checks", type=int, default=100,
                        help="checks (seeds) per CNN row, and per MLP row and bug (default 100)")
    args = parser.parse_args(argv)
    if args.checks < 1:
        parser.error(f"--checks must be at least 1, got {args.checks}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    tables = [cnn_table(args.checks), kinks_table(args.checks), kernels_table(), zoo_table()]
    print("\n\n".join("\n".join(table) for table in tables))
    print(f"\n{args.checks} checks per row (budget 10); torch {torch.__version__}, 1 thread; "
          f"whole run {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

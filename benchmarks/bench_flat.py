"""Verdicts on a correct model trained until its loss is ~0, measured in one run.

    python benchmarks/bench_flat.py            # 20,000 steps, a check every 100 (~2 minutes)
    python benchmarks/bench_flat.py --quick    # 3,000 steps, for a smoke test

`bench_overhead.py`'s MLP (784-256-256-10, ReLU, dropout, Adam, batch 64) trains on 64
repeated synthetic batches, so it memorises them: the cross-entropy at the checked rows falls
from 2.3 to 1e-9 and below. That is where rounding, not the gradient, dominates a loss
evaluation — a confident cross-entropy rounds at ~1e-17 in log(1 + ε) however small J is — and
where a check that misjudges its noise alerts on a correct model. The table counts the verdicts
of `GradWatch(every=100)` (default settings otherwise, no MLflow) by the loss at the checked
rows. A correct model must never read "warn" or "alert"; a check whose loss is too flat to
resolve an alert-sized error must read "error" and say so.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
import sys

from bench_overhead import Trainer, loss_fn, make_batches

from gradwatch import GradWatch

BANDS = ((1e-3, "J ≥ 1e-3"), (1e-7, "1e-7 ≤ J < 1e-3"), (0.0, "J < 1e-7"))


def band(loss: float) -> str:
    return next(name for low, name in BANDS if abs(loss) >= low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="3,000 steps")
    args = parser.parse_args()
    steps = 3_000 if args.quick else args.steps
    watch = GradWatch(every=args.every, mlflow=False, loss_fn=loss_fn)
    trainer = Trainer(make_batches(64), watch)
    chunk = max(steps // 10, 1)
    while trainer.step < steps:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.advance(min(chunk, steps - trainer.step))  # alerts print; counted below
        print(f"[bench] step {trainer.step}/{steps}, {len(watch.reports)} checks",
              file=sys.stderr, flush=True)
    watch.close()
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for report in watch.reports:
        counts[band(report.loss)][report.verdict] += 1
    verdicts = ("ok", "warn", "alert", "error")
    print(f"Verdicts on a correct MLP memorising 64 batches: {steps:,} steps, "
          f"GradWatch(every={args.every}), {len(watch.reports)} checks")
    print()
    print(f"| loss at the checked rows | checks | {' | '.join(verdicts)} |")
    print(f"|---|---:|{'---:|' * len(verdicts)}")
    for _, name in BANDS:
        row = counts.get(name, collections.Counter())
        print(f"| {name} | {sum(row.values())} | "
              + " | ".join(str(row[v]) for v in verdicts) + " |")
    total = collections.Counter[str]()
    for row in counts.values():
        total.update(row)
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[v]) for v in verdicts)
          + " |")
    flat = [r for r in watch.reports if r.verdict == "error"]
    if flat:
        smallest = min(abs(r.loss) for r in flat if math.isfinite(r.loss))
        largest = max(abs(r.loss) for r in flat if math.isfinite(r.loss))
        print()
        print(f"errors: J from {smallest:.1e} to {largest:.1e}; first reason: "
              f"{flat[0].reasons[0][:160]}…")
    if total["warn"] or total["alert"]:
        sys.exit("a correct model read warn/alert")


if __name__ == "__main__":
    main()

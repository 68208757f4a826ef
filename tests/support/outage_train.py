"""A plain PyTorch training loop with GradWatch, run in its own process by the outage tests
(tests/watch/test_never_block.py) with MLflow's *default* client settings.

    python -m tests.support.outage_train --uri URI --spool DIR --out RESULT.json [--steps N] ...

It writes RESULT.json: the training thread's seconds per `watch.step`, the seconds `close()`
took, the checked steps, the run id (once known) and the spool's local id.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--experiment", default="outage")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, besides")
    parser.add_argument("--close-timeout", type=float, default=2.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,),
                                                                  generator=generator)
    watch = GradWatch(every=args.every, tracking_uri=args.uri, spool_dir=args.spool,
                      experiment_name=args.experiment, budget=200,
                      loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    step_seconds = []
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        started = time.perf_counter()
        watch.step(model, (x[:8], y[:8]), step=step)
        step_seconds.append(time.perf_counter() - started)
        time.sleep(args.sleep)
    started = time.perf_counter()
    watch.close(timeout=args.close_timeout)
    args.out.write_text(json.dumps({
        "step_seconds": step_seconds,
        "close_seconds": time.perf_counter() - started,
        "checks": [int(r.probe["step"]) for r in watch.reports],  # type: ignore[call-overload]
        "verdicts": [r.verdict for r in watch.reports],
        "run_id": watch.run_id,
        "local_id": watch.recorder.local_id,  # type: ignore[attr-defined]
        "finished": time.time(),
    }))


if __name__ == "__main__":
    main()

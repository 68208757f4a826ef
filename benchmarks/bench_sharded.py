"""Gradient checks of an FSDP2 model on 2 CPU processes (gloo): cost and detection, one run.

    python benchmarks/bench_sharded.py              # ~1 minute on 2 cores
    python benchmarks/bench_sharded.py --checks 3   # a smoke test

Two ranks train the HF zoo's tiny LLaMA (each decoder layer and the root `fully_shard`-ed)
with `GradWatch(every=2, budget=60)`, once clean and once with a one-row ×1.5 backward bug in
`model.layers.0.mlp.up_proj.weight` (training runs the bug too), each strategy forced in turn:
"gathered" (rank 0 gathers the shards and checks an unsharded float64 copy; rank 1 only takes
part in the gather and waits at the step's agreement) and "collective" (no rank gathers: every
rank perturbs its own shards of a float64 FSDP2 twin and the loss goes through the sharded
forward). Per run it prints the median seconds per check on rank 0 and on rank 1, the median
seconds of the strategy decision and gather, the loss evaluations per check (per rank: every
evaluation of the collective strategy is one forward on each rank), rank 0's peak resident
memory against its resident memory before the first check, the verdicts, the parameter the
alerting checks name first, and the precision the evaluations ran in.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fsdp_worker import BUG  # noqa: E402


def rank_main(out: Path, bug: bool, checks: int, strategy: str) -> None:
    import torch
    import torch.distributed as dist

    import gradwatch.engine.sharded as sharded
    from gradwatch import CheckOptions, GradWatch
    from tests.support.fsdp_worker import llama
    from tests.support.hf_zoo import make_zoo

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    entry = make_zoo("eager")["llama"]
    model = llama(bug)  # each decoder layer and the root sharded, the bug in BUG
    gathers: list[float] = []
    gather = sharded.gather_unsharded

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return gather(*args, **kwargs)
        finally:
            gathers.append(time.perf_counter() - started)

    sharded.gather_unsharded = timed  # type: ignore[assignment]  # time the collective part
    watch = GradWatch(every=2, mlflow=False, budget=60, first_step=False,
                      spool_dir=out / "spool",
                      check=CheckOptions(sharded=strategy))  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1234 + rank)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, reports = [], []
    for step in range(1, 2 * checks + 1):
        batch = entry.batch(100 * step + rank)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        started = time.perf_counter()
        report = watch.step(model, batch, step=step)
        if step % 2 == 0:
            seconds.append(time.perf_counter() - started)
        if report is not None:
            reports.append(report)
    watch.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "seconds": statistics.median(seconds), "gather": statistics.median(gathers),
        "evaluations": [r.evaluations for r in reports],
        "verdicts": [r.verdict for r in reports],
        "named": sorted({r.worst_layers(1)[0][0] for r in reports if r.verdict == "alert"}),
        "rss_before_mib": rss_before / 1024, "rss_peak_mib": peak / 1024,
        "why": reports[0].probe.get("sharding", {}).get("why", "") if reports else "",
        "precision": (reports[0].probe.get("sharding", {}).get("precision", "float64")
                      if reports else ""),
    }
    import json

    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    # torch 2.13's gloo sometimes aborts in its C++ teardown ("terminate called without an
    # active exception"; tests/support/ranks.py): the result is written, leave at once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(bug: bool, checks: int, strategy: str) -> list[dict[str, Any]]:
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        processes = [subprocess.Popen(
            [sys.executable, __file__, "--rank-of", str(out), "--checks", str(checks),
             "--strategy", strategy] + (["--bug"] if bug else []), cwd=ROOT,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in range(2)]
        for process in processes:
            if process.wait(timeout=900) != 0:
                raise SystemExit(f"a rank failed (exit {process.returncode})")
        return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=10, help="checks per run (default 10)")
    parser.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bug", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default=None, choices=("gathered", "collective"),
                        help="one strategy only (default: both, forced in turn)")
    args = parser.parse_args()
    if args.rank_of is not None:
        rank_main(args.rank_of, args.bug, args.checks, args.strategy or "auto")
        return
    header = ["model", "strategy", "checks", "verdicts", "named", "rank 0 s/check",
              "rank 1 s/check", "gather s", "evaluations", "rank 0 RSS MiB (before → peak)",
              "evaluated in"]
    rows = []
    strategies = [args.strategy] if args.strategy else ["gathered", "collective"]
    for strategy, bug in [(s, b) for s in strategies for b in (False, True)]:
        print(f"... {strategy}, {'bug' if bug else 'clean'}", file=sys.stderr, flush=True)
        zero, one = launch(bug, args.checks, strategy)
        verdicts = ", ".join(f"{v} {zero['verdicts'].count(v)}"
                             for v in sorted(set(zero["verdicts"])))
        rows.append([f"tiny LLaMA, {'bug in ' + BUG if bug else 'clean'}", strategy,
                     str(len(zero["verdicts"])), verdicts, ", ".join(zero["named"]) or "-",
                     f"{zero['seconds']:.3f}", f"{one['seconds']:.3f}",
                     f"{zero['gather']:.4f}", f"{statistics.median(zero['evaluations']):g}",
                     f"{zero['rss_before_mib']:.0f} → {zero['rss_peak_mib']:.0f}",
                     zero["precision"]])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"FSDP2 on 2 CPU processes (gloo), GradWatch(every=2, budget=60); "
          f"{zero['why'].split('; ', 1)[-1]}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()

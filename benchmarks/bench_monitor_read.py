"""Load benchmark of `gradwatch monitor`: one poll over many gradwatch runs.

    python benchmarks/bench_monitor_read.py                 # 1,000 runs x 20 layers (~2 min)
    python benchmarks/bench_monitor_read.py --runs 100      # a quick look
    python benchmarks/bench_monitor_read.py --first-poll    # also the monitor's first poll
    python benchmarks/bench_monitor_read.py --runs 10000 --first-poll   # a team (~15 min)

Starts a real `mlflow server` on 127.0.0.1 (sqlite backend), writes N runs in gradwatch's
record layout (one check each: the metrics, the `gradwatch.every` param, the
`gradwatch.status` / `gradwatch.last_step` tags), then times polls of the reader: find the
runs (paged search) and read each run's new checks since its cursor. With nothing new the
cursors make every run free after the search. `--active-share` of the runs (default 1%) stay
RUNNING, the others are ended, as in a team's experiments. Rows: the reader alone (one search
of every run: what every poll cost before sweeps), and the full `Monitor.poll` (cursors and
alert states loaded from its SQLite state, the rules, the staleness look, the /metrics
snapshot): its first poll, its idle polls (only running, new and just-ended runs are
searched), the poll that starts a sweep of every run in the background, the sweep itself and
the poll that merges it. Targets over 10,000 runs: an idle poll
<= 5 s, a first poll <= 60 s, with a steady memory footprint over repeated polls.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from gradwatch.monitor.config import MonitorConfig  # noqa: E402
from gradwatch.monitor.service import Monitor  # noqa: E402
from gradwatch.record.reader import Cursor, find_runs, read_new_checks  # noqa: E402
from tests.support.mlflow_server import MlflowServer  # noqa: E402

STEP = 10


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_runs(client: MlflowClient, experiment: str, runs: int, layers: int) -> None:
    def one(_: int) -> None:
        run_id = client.create_run(experiment).info.run_id
        metrics = [Metric("gradwatch/rel_distance", 1e-9, 1, STEP),
                   Metric("gradwatch/verdict", 0, 1, STEP),
                   Metric("gradwatch/max_element_error", 1e-9, 1, STEP)]
        metrics += [Metric(f"gradwatch/layer/layer{j}.weight", 1e-9, 1, STEP)
                    for j in range(layers)]
        client.log_batch(run_id, metrics=metrics, params=[Param("gradwatch.every", str(STEP))],
                         tags=[RunTag("gradwatch.status", "ok"),
                               RunTag("gradwatch.last_step", str(STEP))])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(runs)))


def end_runs(client: MlflowClient, experiment: str, keep: int) -> None:
    """End every run but the `keep` newest (they stay RUNNING). (MLflow prints each ended
    run's URL unless MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT is set: `main` sets it.)"""
    ids = [run.run_id for run in find_runs(client, ["load"])]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client.set_terminated, ids[:max(len(ids) - keep, 0)]))


def poll(client: MlflowClient, cursors: dict[str, Cursor]) -> tuple[float, int, int]:
    """One reader poll: (seconds, runs found, new checks read)."""
    started = time.perf_counter()
    runs = find_runs(client, ["load"])
    new = 0
    for run in runs:
        checks, cursors[run.run_id] = read_new_checks(client, run, cursors.get(run.run_id))
        new += len(checks)
    return time.perf_counter() - started, len(runs), new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--polls", type=int, default=5, help="idle polls to time")
    parser.add_argument("--first-poll", action="store_true",
                        help="also time the first poll, which reads every run's history")
    parser.add_argument("--active-share", type=float, default=0.01,
                        help="share of the runs left RUNNING (default 0.01)")
    args = parser.parse_args(argv)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    with tempfile.TemporaryDirectory() as directory:
        server = MlflowServer(Path(directory))
        progress("starting a local mlflow server")
        server.start()
        try:
            client = MlflowClient(server.url)
            experiment = client.create_experiment("load")
            progress(f"writing {args.runs} runs x {args.layers} layers")
            started = time.perf_counter()
            write_runs(client, experiment, args.runs, args.layers)
            active = round(args.runs * args.active_share)
            progress(f"ending all but {active} runs")
            end_runs(client, experiment, active)
            written = time.perf_counter() - started
            # the reader alone, as a monitor that has read the runs already
            cursors = {run.run_id: Cursor(run.run_id, last_step=STEP)
                       for run in find_runs(client, ["load"])}
            idle = []
            for _ in range(args.polls):
                seconds, _, new = poll(client, cursors)
                assert new == 0, "an idle poll read checks"
                idle.append(seconds)
            config = MonitorConfig(tracking_uri=server.url, experiments=["load"],
                                   state_url=f"sqlite:///{directory}/state.db")
            monitor = Monitor(config, client=client, notifiers={})
            monitor_first = math.nan
            if args.first_poll:
                progress("the full monitor's first poll (reads every run, in bulk)")
                started = time.perf_counter()
                summary = monitor.poll()
                monitor_first = time.perf_counter() - started
                assert summary.runs == args.runs, summary
            else:  # a monitor that has read them already
                for cursor in cursors.values():
                    monitor.state.save_cursor(cursor)
            monitor_idle = []
            for _ in range(args.polls):
                started = time.perf_counter()
                summary = monitor.poll()
                monitor_idle.append(time.perf_counter() - started)
                assert summary.new_checks == 0 and summary.runs == args.runs, summary
            monitor._swept_at = -math.inf  # the next poll starts a sweep in the background
            started = time.perf_counter()
            summary = monitor.poll()
            monitor_sweep_start = time.perf_counter() - started
            sweep = monitor._sweep
            assert sweep is not None
            sweep.result()
            monitor_sweep = time.perf_counter() - started
            started = time.perf_counter()
            summary = monitor.poll()  # merges the sweep
            monitor_merge = time.perf_counter() - started
            assert summary.new_checks == 0 and summary.runs == args.runs, summary
            monitor.close()
            tracemalloc.start()  # memory on its own polls: tracing slows Python down
            peaks = []
            for _ in range(3):
                gc.collect()
                poll(client, cursors)
                peaks.append(tracemalloc.get_traced_memory()[0] / 2**20)
            tracemalloc.stop()
        finally:
            server.kill()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worst = max(monitor_idle)
    print(f"monitor reader load benchmark - {args.runs} runs x {args.layers} layers "
          f"({active} running), real mlflow server on 127.0.0.1 (sqlite), written in "
          f"{written:.1f} s\n")
    print(f"reader alone, one search of every run + cursors (nothing new), seconds: "
          f"{', '.join(f'{s:.2f}' for s in idle)}")
    if args.first_poll:
        print(f"full monitor, first poll (reads every check of {args.runs} runs; histories "
              f"in bulk, one call per metric key per 100 runs): {monitor_first:.2f} s "
              f"{'PASS' if monitor_first <= 60 else 'MISS'} (target <= 60 s)")
    print(f"full monitor, idle polls between sweeps, seconds: "
          f"{', '.join(f'{s:.2f}' for s in monitor_idle)}")
    print(f"full monitor, the poll that starts a sweep: {monitor_sweep_start:.2f} s; the sweep "
          f"(every run searched, in the background): {monitor_sweep:.2f} s; the poll that "
          f"merges it: {monitor_merge:.2f} s")
    worst = max(worst, monitor_sweep_start, monitor_merge)
    print(f"traced Python memory after idle polls, MiB: "
          f"{', '.join(f'{m:.1f}' for m in peaks)}  (max RSS {rss:.0f} MiB)")
    growth = peaks[-1] - peaks[0] if len(peaks) > 1 else 0.0
    print(f"target: idle poll over {args.runs} runs <= 5 s -> worst {worst:.2f} s "
          f"{'PASS' if worst <= 5 else 'MISS'}; memory growth over the idle polls "
          f"{growth:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

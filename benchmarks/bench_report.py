"""Benchmark of the HTML dashboards: page size, build time and Chromium render time.

    python benchmarks/bench_report.py                      # 20x100 and 200x1000 runs (~3 min)
    python benchmarks/bench_report.py --sizes 200x1000     # layers x checks, comma-separated
    python benchmarks/bench_report.py --no-browser         # size and build time only

Starts a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) and writes one
run per size in gradwatch's record layout: every check's metrics (overall distance, verdict,
one `gradwatch/layer/*` per layer; an alert spell in one layer and one NaN check included),
the tags and params, and a `gradwatch/checks/step-*.json` artifact per check (the full
CheckReport for the latest 10 checks, the ones the report reads; `{}` for the others, which are
only listed). Then, per run:

- build: `build_run_report`'s two halves, in seconds: read (`read_run`: the metric histories
  and 10 artifacts, one MLflow call per metric key) and html (charts, tables, page);
- size of the HTML in MB (Vega, Vega-Lite and Vega-Embed are ~0.8 MB of it);
- render: headless Chromium opens the file and draws every chart (svg renderer); the page's
  own `performance.now()` when the last chart is done, so navigation, parsing the inline
  scripts and drawing are counted; median of `--renders` tabs;
- png: drawing the PNG of `render_run_png` (matplotlib Agg) from the data read, seconds.

And one experiment dashboard over `--experiment-runs` runs (each `--experiment-checks` checks
of `--experiment-layers` layers).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from gradwatch.dashboard.data import WORST_CHECKS, read_experiment, read_run  # noqa: E402
from gradwatch.dashboard.png import draw_run_png  # noqa: E402
from gradwatch.dashboard.report import _experiment_page, _run_page  # noqa: E402
from gradwatch.record.layout import artifact_path, layer_metric_keys  # noqa: E402
from tests.support.browser import Chromium, chromium_path  # noqa: E402
from tests.support.dashboard_runs import element, report  # noqa: E402
from tests.support.mlflow_server import MlflowServer  # noqa: E402

T = TypeVar("T")
STEP = 10
T0_MS = 1_700_000_000_000
VERDICTS = {"ok": 0.0, "warn": 1.0, "alert": 2.0, "error": 3.0}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def distances(layers: int, check: int, checks: int) -> tuple[float, dict[str, float]]:
    """The overall and per-layer distances of check number `check`: noise around 1e-9, an
    alert spell in layer 7 over the middle tenth of the run, a NaN check at 3/4."""
    names = [f"encoder.layer.{i // 4}.{('q', 'k', 'v', 'o')[i % 4]}.weight"
             for i in range(layers)]
    values = {name: 1e-9 * (1 + (i * 7 + check * 13) % 17) for i, name in enumerate(names)}
    if 0.45 * checks <= check < 0.55 * checks:
        values[names[min(7, layers - 1)]] = 0.2
    if check == int(0.75 * checks):
        values = dict.fromkeys(names, math.nan)
    finite = [v for v in values.values() if math.isfinite(v)]
    overall = max(finite) if len(finite) == len(values) else math.nan
    return overall, values


def write_run(client: MlflowClient, experiment_id: str, name: str, layers: int,
              checks: int, pool: ThreadPoolExecutor) -> str:
    run_id: str = client.create_run(experiment_id, run_name=name).info.run_id
    client.log_batch(run_id, params=[Param("gradwatch.every", str(STEP)),
                                     Param("gradwatch.threshold.warn", "1e-05"),
                                     Param("gradwatch.threshold.alert", "0.001")])
    metrics: list[Metric] = []
    verdict = "ok"
    for check in range(checks):
        step, timestamp = (check + 1) * STEP, T0_MS + check * 1000
        overall, values = distances(layers, check, checks)
        verdict = "error" if math.isnan(overall) else "alert" if overall >= 1e-3 else "ok"
        keys = layer_metric_keys(values)
        metrics += [Metric("gradwatch/rel_distance", overall, timestamp, step),
                    Metric("gradwatch/verdict", VERDICTS[verdict], timestamp, step)]
        metrics += [Metric(keys[n], v, timestamp, step) for n, v in values.items()]

    def log(start: int) -> None:
        client.log_batch(run_id, metrics=metrics[start:start + 1000])

    list(pool.map(log, range(0, len(metrics), 1000)))

    def artifact(check: int) -> None:
        step = (check + 1) * STEP
        if check < checks - WORST_CHECKS:
            text = "{}"
        else:
            overall, values = distances(layers, check, checks)
            worst = {name: [element((i % 5, i % 3), 1.0, 1.0 + v)] for i, (name, v) in
                     enumerate(values.items()) if math.isfinite(v)}
            text = report(values, overall=overall, worst=worst).model_dump_json()
        client.log_text(run_id, text, artifact_path(step))

    list(pool.map(artifact, range(checks)))
    client.set_tag(run_id, "gradwatch.status", verdict)
    client.set_tag(run_id, "gradwatch.last_step", str(checks * STEP))
    return run_id


def timed(function: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def render_seconds(browser: Chromium | None, path: Path, renders: int) -> float:
    if browser is None:
        return math.nan
    times = []
    for _ in range(renders):
        page = browser.new_page()
        try:
            page.navigate(path.as_uri())
            page.wait_for("document.body !== null && document.body.dataset.rendered === 'true'",
                          timeout=300, fail_if="document.body !== null && "
                                               "document.body.dataset.renderError")
            errors = page.errors()
            assert not errors, errors
            times.append(float(page.evaluate("document.body.dataset.renderMs")) / 1000)
        finally:
            page.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="20x100,200x1000",
                        help="runs to benchmark, as LAYERSxCHECKS, comma-separated")
    parser.add_argument("--experiment-runs", type=int, default=20)
    parser.add_argument("--experiment-layers", type=int, default=50)
    parser.add_argument("--experiment-checks", type=int, default=200)
    parser.add_argument("--renders", type=int, default=3, help="Chromium renders per page")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    sizes = [tuple(int(n) for n in size.lower().split("x")) for size in args.sizes.split(",")]
    use_browser = not args.no_browser and chromium_path() is not None
    if not args.no_browser and not use_browser:
        progress("no Chromium binary: render times are left out")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(8) as pool:
        folder = Path(directory)
        server = MlflowServer(folder / "mlflow")
        (folder / "mlflow").mkdir()
        progress("starting a local mlflow server")
        server.start()
        browser = Chromium.launch(folder / "chromium") if use_browser else None
        try:
            client = MlflowClient(server.url)
            experiment_id = client.create_experiment("bench-report")
            for layers, checks in sizes:
                progress(f"writing a run of {layers} layers x {checks} checks")
                run_id = write_run(client, experiment_id, f"run-{layers}x{checks}", layers,
                                   checks, pool)
                progress("reading, building, rendering")
                read, run_data = timed(partial(read_run, client, run_id))
                build, page = timed(partial(_run_page, run_data, server.url))
                path = folder / f"report-{layers}x{checks}.html"
                path.write_text(page, encoding="utf-8")
                png, _ = timed(partial(draw_run_png, run_data, path.with_suffix(".png")))
                rows.append({"page": f"run report, {layers} layers x {checks} checks",
                             "mb": path.stat().st_size / 1e6, "read_s": read, "html_s": build,
                             "render_s": render_seconds(browser, path, args.renders),
                             "png_s": png})
            runs, layers, checks = (args.experiment_runs, args.experiment_layers,
                                    args.experiment_checks)
            if runs:
                experiment = client.create_experiment("bench-experiment")
                progress(f"writing {runs} runs of {layers} layers x {checks} checks")
                for number in range(runs):
                    write_run(client, experiment, f"run-{number}", layers, checks, pool)
                read, experiment_data = timed(partial(read_experiment, client, experiment))
                build, page = timed(partial(_experiment_page, experiment_data, server.url))
                path = folder / "experiment.html"
                path.write_text(page, encoding="utf-8")
                rows.append({"page": f"experiment dashboard, {runs} runs x {layers} layers x "
                                     f"{checks} checks", "mb": path.stat().st_size / 1e6,
                             "read_s": read, "html_s": build,
                             "render_s": render_seconds(browser, path, args.renders),
                             "png_s": math.nan})
        finally:
            if browser is not None:
                browser.close()
            server.kill()
    width = max(len(str(row["page"])) for row in rows)
    print(f"\ngradwatch dashboards - real mlflow server on 127.0.0.1 (sqlite), headless "
          f"Chromium (svg renderer), median of {args.renders} renders\n")
    print(f"{'page':<{width}}  {'size MB':>8}  {'build s':>8}  {'(read s':>8}  {'html s)':>8}"
          f"  {'render s':>9}  {'png s':>7}")
    for row in rows:
        read, html = float(str(row["read_s"])), float(str(row["html_s"]))
        print(f"{row['page']!s:<{width}}  {row['mb']:>8.2f}  {read + html:>8.2f}  {read:>8.2f}  "
              f"{html:>8.2f}  {row['render_s']:>9.2f}  {row['png_s']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-contained HTML pages of the MLflow record: the run report and the experiment dashboard.

Self-contained HTML dashboards of gradwatch's MLflow record: a run report and an experiment
dashboard, each ONE file that opens anywhere (a laptop, an MLflow artifact view, an e-mail
attachment) without a network.

    build_run_report(client, run_id)             → str (HTML)
    log_run_report(client, run_id)               → logs gradwatch/report.html (+ .png) to the run
    log_requested_report(client, payload)        → the same, for a spooled "report" record
    build_experiment_dashboard(client, "name")   → str (HTML)
    render_run_png(client, run_id, "r.png")      → a static PNG of the same charts

What is inside a page:

- Vega, Vega-Lite and Vega-Embed (minified, from `gradwatch/dashboard/static/`, BSD-3-Clause, their
  licences at the bottom of the page) and the charts' specs with their data, all inline. The
  only absolute links are the ones to the MLflow UI, when a tracking URL is known.
- A Content-Security-Policy that allows exactly the page's own scripts (by hash), inline styles
  and data:/blob: images, and no connection at all, so a report cannot fetch anything even if
  a library wanted to. Vega runs with its expression interpreter (`ast: true`), not `eval`.
- User-controlled text (run, experiment and layer names, params) is escaped: HTML text with
  `html.escape`, and chart data as JSON in `<script type="application/json">` with `<`, `>`,
  `&`, U+2028 and U+2029 written as `\\uXXXX`, so no name can close the script element.
- `<body data-rendered="true">` once every chart is drawn (`data-render-error` if one failed),
  for tests and headless renderers; `data-render-ms` is the time from navigation to then.

The charts and how they scale are described in `gradwatch.dashboard.charts`; what is read
from MLflow, and at what cost, in `gradwatch.dashboard.data`.

Imports: gradwatch.common, gradwatch.record, the other dashboard modules.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from gradwatch.common.errors import ConfigError
from gradwatch.common.version import __version__
from gradwatch.dashboard.charts import (
    experiment_distance_chart,
    format_distance,
    format_ratio,
    keep_end,
    precision_checks,
    run_distance_chart,
    run_label,
    run_layers_chart,
    run_precision_chart,
    short_number,
)
from gradwatch.dashboard.data import (
    WORST_CHECKS,
    WORST_ELEMENTS_PER_CHECK,
    ExperimentData,
    RunData,
    RunSummary,
    alerted_layers,
    read_experiment,
    read_run,
)
from gradwatch.record.layout import LAYER_PREFIX, REPORT_HTML, REPORT_PNG

__all__ = [
    "build_experiment_dashboard",
    "build_run_report",
    "log_requested_report",
    "log_run_report",
    "render_run_png",
    "run_page_url",
]

#: Loaded in this order (vega-lite and vega-embed find `vega` / `vegaLite` as globals).
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
LICENCES = ("vega-LICENSE.txt", "vega-lite-LICENSE.txt", "vega-embed-LICENSE.txt")
SHOWN_ALERTED_LAYERS = 8  # per run in the experiment table; the rest behind "more"
#: The longest a layer name is shown in a table; a longer one keeps its end (the part that
#: tells a weight from a bias) and shows in full on hover. 60 characters of the page's font
#: take about 420 px: the worst-elements table stays within 1,000 px.
LAYER_NAME_CHARS = 60

#: Under the distance chart of a run that also measured the training kernels.
_FOLDED_NOTE = (
    '<p class="note">Point colours and red shading here are the check\'s verdict, which '
    "includes the training-kernels measurement's (see \"Training kernels\" below); the "
    "distances themselves are the backprop definition's.</p>"
)

_JSON_ESCAPES = str.maketrans({
    "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029",
})

# -- public -----------------------------------------------------------------------------------


def build_run_report(
    client: Any, run_id: str, *, tracking_url: str | None = None,
    worst_checks: int = WORST_CHECKS,
) -> str:
    """One self-contained HTML report of a run's gradient checks.

    Charts: the overall distance per check (log scale, warn/alert bands, alert periods
    shaded), a layer × step heatmap, and a table of the worst elements of the latest
    `worst_checks` checks; for a run whose checks measured the training kernels, also that
    measurement's ratio per check (log scale, its warn/alert ratio bands) and a per-layer
    table of its ratios. `tracking_url` (http or https) links the run to its MLflow page;
    by default the client's tracking URI when that is http(s), else no link.

    Example (against a real server; see tests/dashboard/test_dashboard_html.py):
        client = mlflow.MlflowClient("http://127.0.0.1:5000")
        Path("report.html").write_text(build_run_report(client, run_id), encoding="utf-8")
    """
    base = _base_url(client, tracking_url)
    return _run_page(read_run(client, run_id, worst_checks=worst_checks), base)


def log_run_report(
    client: Any, run_id: str, *, tracking_url: str | None = None,
    worst_checks: int = WORST_CHECKS, png: bool = False,
) -> list[str]:
    """Build the run report and log it to the run as `gradwatch/report.html` (and the PNG as
    `gradwatch/report.png` with `png=True`); returns the artifact paths written.

    Only artifacts are written, through `client` with the explicit `run_id`: the run's
    status, params, metrics and tags are left as they are. Logging again overwrites.
    """
    base = _base_url(client, tracking_url)
    data = read_run(client, run_id, worst_checks=worst_checks)
    client.log_text(run_id, _run_page(data, base), REPORT_HTML)
    written = [REPORT_HTML]
    if png:
        from gradwatch.dashboard.png import draw_run_png

        with tempfile.TemporaryDirectory(prefix="gradwatch-png-") as folder:
            folder_name, _, file_name = REPORT_PNG.rpartition("/")
            local = draw_run_png(data, Path(folder) / file_name)
            client.log_artifact(run_id, str(local), folder_name)
        written.append(REPORT_PNG)
    return written


def log_requested_report(client: Any, payload: Mapping[str, Any]) -> None:
    """Build and log the run report a spooled "report" record asks for
    (`gradwatch.record.writer.report_payload`): the report builder the watch and
    `gradwatch flush` hand to `gradwatch.record.writer.Deliverer`.

    With `png` asked for but matplotlib missing (mlflow-skinny), the HTML report alone.
    """
    try:
        log_run_report(client, payload["run_id"], png=bool(payload.get("png")))
    except ImportError:  # no matplotlib: the HTML report alone
        log_run_report(client, payload["run_id"])


def render_run_png(client: Any, run_id: str, path: str | Path) -> Path:
    """A static PNG of the run's distance chart and layer heatmap, written to `path`.

    Reads the run's metric histories and its latest check artifact (for the layers' names and
    model order). Drawn with matplotlib's Agg canvas on a private `Figure` (pyplot and the
    global backend are not touched). Returns the path written.
    """
    from gradwatch.dashboard.png import draw_run_png

    return draw_run_png(read_run(client, run_id, worst_checks=1), Path(path))


def build_experiment_dashboard(
    client: Any, experiment: str, *, tracking_url: str | None = None, layers: bool = True
) -> str:
    """One self-contained HTML dashboard of every gradwatch run in `experiment` (a name or an
    id): each run's latest verdict, its distance over steps, the layers that ever reached its
    alert threshold, and a link to its MLflow page when a tracking URL is known.

    Finding the layers that alerted reads every layer's history of every run (one MLflow call
    each); `layers=False` leaves that column out, for a quick look at a large experiment.
    An unknown experiment raises ConfigError listing the known ones.
    """
    base = _base_url(client, tracking_url)
    return _experiment_page(read_experiment(client, experiment, layers=layers), base)


def run_page_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run.

    Example:
        >>> run_page_url("http://mlflow:5000", "3", "ab12")
        'http://mlflow:5000/#/experiments/3/runs/ab12'
    """
    return f"{base_url}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"


# -- the run page -----------------------------------------------------------------------------


def _run_page(data: RunData, base: str | None) -> str:
    run, checks = data.run, data.checks
    title = f"gradwatch report: {run.name or run.run_id}"
    charts: dict[str, Any] = {}
    parts = [_run_header(data, base), _run_cards(data)]
    if checks:
        charts["chart-distance"] = run_distance_chart(data)
        parts.append(_section(
            "Overall relative distance",
            "Each check's distance between backprop and central differences, log scale. "
            "Bands: warn and alert ranges; dashed lines: the run's thresholds; red shading: "
            "stretches of alert/error checks. NaN and ±inf are drawn at the top (×, ▲), "
            "a distance of 0 at the bottom (▼).",
            '<div id="chart-distance" class="chart"></div>'
            + (_FOLDED_NOTE if data.kernels is not None else "")))
        if data.layer_order:
            spec, layout = run_layers_chart(data)
            charts["chart-layers"] = spec
            warn, alert = (short_number(t) for t in (data.thresholds.warn,
                                                     data.thresholds.alert))
            parts.append(_section(
                "Per-layer distance",
                f"{layout.describe()} Colours are set by the run's thresholds, not by its "
                f"range: blue-grey below warn ({warn}), darker per decade; amber from warn; "
                f"red from alert ({alert}); black: NaN or ±inf; blank: not checked.",
                '<div id="chart-layers" class="chart"></div>'))
        parts.append(_alerted_section(data))
        precision = run_precision_chart(data)
        if precision is not None:
            charts["chart-precision"] = precision
            parts.append(_kernels_section(data))
    else:
        parts.append(_section("No checks yet", "This run has no gradwatch check in MLflow "
                              "(no gradwatch/rel_distance metric).", ""))
    parts.append(_worst_section(data))
    parts.append(_settings_section(data))
    return _page(title, "\n".join(parts), charts)


def _run_header(data: RunData, base: str | None) -> str:
    run = data.run
    name = _text(run.name or "(unnamed run)")
    if base:
        name = _link(run_page_url(base, run.experiment_id, run.run_id), name)
    return (
        f'<header><h1>Gradient checks: {name}</h1>'
        f'<p class="meta">run <code>{_text(run.run_id)}</code> · experiment '
        f'{_text(data.experiment_name)} (id {_text(run.experiment_id)}) · MLflow status '
        f'{_text(run.status)} · generated {_now()} by gradwatch {_text(__version__)}</p>'
        f'</header>'
    )


def _run_cards(data: RunData) -> str:
    checks = data.checks
    counts = Counter(check.verdict_word or "unknown" for check in checks)
    latest = checks[-1] if checks else None
    first_alert = next((c.step for c in checks if c.verdict is not None and c.verdict >= 2),
                       None)
    worst_check = max(checks, key=lambda c: _severity(c.rel_distance), default=None)
    by_verdict = ", ".join(f"{counts[w]:,} {w}" for w in ("ok", "warn", "alert", "error",
                                                          "unknown") if counts[w])
    cards = [
        ("latest verdict", _badge(data.run.gradwatch_status or
                                  (latest.verdict_word if latest else None))),
        ("checks", f"{len(checks):,}" + (f" <small>({by_verdict})</small>" if checks else "")),
        ("latest step", _text(str(latest.step)) if latest else "–"),
        ("latest distance", _text(format_distance(latest.rel_distance)) if latest else "–"),
        ("worst distance", (f"{_text(format_distance(worst_check.rel_distance))} "
                            f"<small>at step {worst_check.step}</small>") if worst_check else "–"),
        ("first alert", f"step {first_alert}" if first_alert is not None else "none"),
        ("thresholds", f"warn {short_number(data.thresholds.warn)} · "
                       f"alert {short_number(data.thresholds.alert)}"),
    ]
    measured = precision_checks(data)
    if measured:
        newest = measured[-1]
        cards.insert(4, ("training kernels", (
            f"{_badge(newest.precision_verdict_word)} <small>ratio "
            f"{_text(format_ratio(newest.precision_ratio))} at step {newest.step}</small>")))
    return '<section class="cards">' + "".join(
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div>'
        f'</div>' for label, value in cards) + "</section>"


def _alerted_section(data: RunData) -> str:
    found = alerted_layers(data.checks, data.thresholds.alert)
    alert = short_number(data.thresholds.alert)
    if not found:
        return _section("Layers that reached the alert threshold",
                        f"None: every layer distance stayed below {alert}.", "")
    counts = Counter(key for check in data.checks for key, value in check.layers.items()
                     if key in found and not (math.isfinite(value) and
                                              value < data.thresholds.alert))
    order = {key: i for i, key in enumerate(data.layer_order)}
    rows = [
        [layer_name_html(data.layer_names.get(key, key)), str(first),
         _text(format_distance(worst_value)), f"{counts[key]:,}"]
        for key, (first, worst_value) in sorted(found.items(), key=lambda kv: order.get(kv[0], 0))
    ]
    return _section(
        "Layers that reached the alert threshold",
        f"Layers with a distance ≥ {alert} (or NaN/±inf) at some check.",
        _table(["layer", "first step", "worst distance", "checks at or above"], rows,
               numeric=(1, 2, 3)))


def _kernels_section(data: RunData) -> str:
    """The training-kernels measurement: its ratio chart and a table of its layers."""
    kernels = data.kernels
    assert kernels is not None  # the caller checks
    warn, alert = kernels.thresholds.warn, kernels.thresholds.alert
    how = [kernels.dtype or "training dtype unknown"]
    if kernels.autocast:
        how.append(f"autocast {kernels.autocast}")
    if kernels.compiled:
        how.append("compiled")
    if kernels.custom_ops:
        how.append("custom ops " + ", ".join(kernels.custom_ops))
    if kernels.device:
        how.append(f"on {kernels.device}")
    source = f" (as of step {kernels.step}: {'; '.join(how)})" if kernels.step is not None \
        else ""
    note = (f"The gradient as training computes it{source} against the float64 gradient the "
            f"central differences validated. Ratio = its distance from float64 / the distance "
            f"of a correct computation at the same precision (emulated): about 1 is right. Bands "
            f"and dashed lines: the run's ratio thresholds, warn {warn:g} and alert {alert:g}; "
            f"red shading: stretches where this measurement alerted or failed (squares at the "
            f"top: it could not run). The backprop definition above can be right while the "
            f"kernels training runs are wrong.")
    return _section("Training kernels (precision)", note,
                    '<div id="chart-precision" class="chart"></div>' + _kernel_table(data))


def _kernel_table(data: RunData) -> str:
    """Each layer's training-kernels ratio: latest, worst (and where), checks at or above
    the alert ratio. Red: at or above the alert ratio, or not finite."""
    kernels = data.kernels
    assert kernels is not None
    measured = precision_checks(data)
    alert = kernels.thresholds.alert

    def severe(value: float) -> bool:
        return not math.isfinite(value) or value >= alert

    rows = []
    for key in kernels.layer_order:
        values = [(c.step, c.precision_layers[key]) for c in measured if key in c.precision_layers]
        if not values:
            continue
        worst_step, worst = max(values, key=lambda item: _severity(item[1]))
        latest_step, latest = values[-1]
        rows.append([
            layer_name_html(kernels.layer_names.get(key, key)),
            _severe(format_ratio(latest), severe(latest)), str(latest_step),
            _severe(format_ratio(worst), severe(worst)), str(worst_step),
            f"{sum(severe(v) for _, v in values):,} of {len(values):,}",
        ])
    if not rows:
        return "<p>No layer ratio was logged (the measurement did not run to the end).</p>"
    return _table(["layer", "latest ratio", "at step", "worst ratio", "at step",
                   f"checks ≥ {alert:g}"], rows, numeric=(1, 2, 3, 4, 5))


def _worst_section(data: RunData) -> str:
    title = "Worst elements"
    if not data.artifact_steps:
        return _section(title, "No check artifacts (gradwatch/checks/step-*.json) in this run.",
                        "")
    steps = data.worst_steps
    if not steps:
        return _section(title, "Not read (worst_checks=0).", "")
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    which = (f"the latest {len(steps):,} of {len(data.artifact_steps):,} checks ({span})"
             if len(steps) < len(data.artifact_steps) else f"all {len(steps):,} checks ({span})")
    note = (f"Each check's {WORST_ELEMENTS_PER_CHECK} worst elements over all layers, for "
            f"{which}, newest first. rel. error = |numeric − analytic| / scale (floor-protected);"
            f" kink: the central difference straddles a non-differentiable point.")
    alert = data.thresholds.alert
    rows = [
        [str(e.step), layer_name_html(e.layer), _text(str(list(e.index))), _number(e.analytic),
         _number(e.numeric), _number(e.abs_diff),
         _severe(format_distance(e.rel_error),
                 not math.isfinite(e.rel_error) or e.rel_error >= alert),
         "yes" if e.kink else ""]
        for e in sorted(data.worst_elements, key=lambda e: -e.step)
    ]
    if not rows:
        return _section(title, note, "<p>No element was checked.</p>")
    table = _table(
        ["step", "layer", "index", "analytic", "numeric", "|diff|", "rel. error", "kink"],
        rows, numeric=(0, 3, 4, 5, 6))
    return _section(title, note + f" Red: at or above the alert threshold ({short_number(alert)}).",
                    table)


def _settings_section(data: RunData) -> str:
    rows = [[_text(key), _text(value)] for key, value in sorted(data.run.params.items())]
    return _section("Settings", "The run's gradwatch.* params.",
                    _table(["param", "value"], rows) if rows else "<p>None logged.</p>")


# -- the experiment page ----------------------------------------------------------------------


def _experiment_page(data: ExperimentData, base: str | None) -> str:
    title = f"gradwatch: experiment {data.name}"
    counts = Counter(summary.run.gradwatch_status or "unknown" for summary in data.runs)
    header = (
        f'<header><h1>Gradient checks: experiment {_text(data.name)}</h1>'
        f'<p class="meta">experiment id {_text(data.experiment_id)} · {len(data.runs):,} '
        f'gradwatch runs (' + (", ".join(f"{n:,} {_text(w)}" for w, n in counts.most_common())
                               or "none") +
        f') · generated {_now()} by gradwatch {_text(__version__)}</p></header>'
    )
    charts: dict[str, Any] = {}
    parts = [header]
    if any(summary.checks for summary in data.runs):
        charts["chart-runs"] = experiment_distance_chart(data)
        parts.append(_section(
            "Overall relative distance per run",
            "One line per run, log scale; alert checks are red points, error checks purple, "
            "NaN and ±inf marked at the top. Dashed lines: the thresholds most runs use "
            "(amber warn, red alert). Runs with many checks show the worst check of each "
            "group of consecutive checks.",
            '<div id="chart-runs" class="chart"></div>'))
    columns = ["run", "MLflow status", "latest verdict", "last step", "checks",
               "latest distance", "worst distance"]
    note = "Latest verdict is the run's gradwatch.status tag."
    if data.layers_read:
        columns.append("layers that ever alerted")
        note += (" Layers that ever alerted: a layer distance ≥ the run's "
                 "gradwatch.threshold.alert (default 1e-3), or NaN/±inf.")
    else:
        note += " Layer histories were not read (layers=False)."
    rows = [_run_row(summary, base)[:len(columns)] for summary in data.runs]
    parts.append(_section(
        "Runs", note, _table(columns, rows, numeric=(3, 4, 5, 6)) if data.runs
        else "<p>No run in this experiment has gradwatch data.</p>"))
    return _page(title, "\n".join(parts), charts)


def _run_row(summary: RunSummary, base: str | None) -> list[str]:
    run, checks = summary.run, summary.checks
    label = _text(run_label(run.name, run.run_id))
    if base:
        label = _link(run_page_url(base, run.experiment_id, run.run_id), label, new_tab=True)
    latest = checks[-1] if checks else None
    worst_check = max(checks, key=lambda c: _severity(c.rel_distance), default=None)
    return [
        label, _text(run.status), _badge(run.gradwatch_status),
        _text(str(run.last_step if run.last_step is not None else
                  (latest.step if latest else "–"))),
        f"{len(checks):,}",
        _text(format_distance(latest.rel_distance)) if latest else "–",
        _text(format_distance(worst_check.rel_distance)) if worst_check else "–",
        _layer_list(summary.alerted_layers, summary.layer_names),
    ]


def _layer_list(found: Mapping[str, tuple[int, float]], names: Mapping[str, str]) -> str:
    if not found:
        return "none"
    items = [
        f"<li>{layer_name_html(names.get(key, key.removeprefix(LAYER_PREFIX)))} "
        f"<small>from step {first}, worst {_text(format_distance(value))}</small></li>"
        for key, (first, value) in sorted(found.items(), key=lambda kv: kv[1][0])
    ]
    shown = "<ul>" + "".join(items[:SHOWN_ALERTED_LAYERS]) + "</ul>"
    if len(items) > SHOWN_ALERTED_LAYERS:
        shown += (f"<details><summary>{len(items) - SHOWN_ALERTED_LAYERS} more</summary><ul>"
                  + "".join(items[SHOWN_ALERTED_LAYERS:]) + "</ul></details>")
    return shown


# -- HTML pieces ------------------------------------------------------------------------------


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def layer_name_html(name: str, limit: int = LAYER_NAME_CHARS) -> str:
    """A layer name for a table cell: escaped, and when longer than `limit` cut at the start
    (see `keep_end`) with the full name in the title, shown on hover."""
    shown = keep_end(name, limit)
    if shown == name:
        return _text(name)
    return f'<span class="cut" title="{_text(name)}">{_text(shown)}</span>'


def _severe(text: str, severe: bool) -> str:
    return f'<span class="severe">{_text(text)}</span>' if severe else _text(text)


def _number(value: float) -> str:
    return _text(f"{value:.6g}" if math.isfinite(value) else format_distance(value))


def _severity(value: float) -> tuple[int, float]:
    return (2, 0.0) if math.isnan(value) else (1, 0.0) if math.isinf(value) else (0, value)


def _badge(verdict: str | None) -> str:
    word = verdict if verdict in ("ok", "warn", "alert", "error") else "unknown"
    shown = _text(verdict) if verdict else "no check yet"
    return f'<span class="badge v-{word}">{shown}</span>'


def _link(url: str, label_html: str, *, new_tab: bool = False) -> str:
    target = ' target="_blank" rel="noopener noreferrer"' if new_tab else ""
    return f'<a href="{_text(url)}"{target}>{label_html}</a>'


def _section(title: str, note: str, body: str) -> str:
    return (f"<section><h2>{_text(title)}</h2><p class=\"note\">{_text(note)}</p>{body}"
            f"</section>")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *,
           numeric: Sequence[int] = ()) -> str:
    """A table from cells that are already HTML (escape before)."""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def script_json(value: object) -> str:
    """JSON that is safe inside `<script type="application/json">` (and valid JSON: no NaN).

    Example:
        >>> script_json({"layer": "</script><b>&\u2028"})
        '{"layer":"\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026\\\\u2028"}'
    """
    text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return text.translate(_JSON_ESCAPES)


@cache
def _static(name: str) -> str:
    text = (resources.files("gradwatch.dashboard") / "static" / name).read_text("utf-8")
    if name.endswith(".js") and "</script" in text.lower():
        raise RuntimeError(f"gradwatch/dashboard/static/{name} contains '</script' and cannot "
                           f"be inlined")
    return text


def _script_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


_RENDER = """
(function () {
  "use strict";
  var body = document.body;
  var charts = JSON.parse(document.getElementById("gradwatch-charts").textContent);
  var options = {renderer: "svg", ast: true,
                 actions: {export: true, source: false, compiled: false, editor: false}};
  Promise.all(Object.keys(charts).map(function (id) {
    var box = document.getElementById(id);
    return vegaEmbed(box, charts[id], options).catch(function (error) {
      box.textContent = "This chart could not be drawn: " + error;
      box.className += " chart-error";
      throw error;
    });
  })).then(function () {
    body.setAttribute("data-render-ms", String(Math.round(performance.now())));
    body.setAttribute("data-rendered", "true");
  }, function (error) {
    body.setAttribute("data-render-error", String(error));
    console.error("gradwatch: a chart could not be drawn:", error);
  });
})();
"""

_STYLE = """
:root { color-scheme: light; --ok: #2ca02c; --warn: #b8860b; --alert: #d62728; --error: #6a3d9a; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       padding: 16px 24px 40px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 17px; margin: 28px 0 4px; }
.meta, .note { color: #555; margin: 2px 0 10px; overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card .label { color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.card .value { font-size: 16px; margin-top: 2px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff;
         background: #999; font-weight: 600; }
.v-ok { background: var(--ok); } .v-warn { background: var(--warn); }
.v-alert { background: var(--alert); } .v-error { background: var(--error); }
.chart { width: 100%; min-height: 60px; }
.chart .vega-embed { width: 100%; }
.chart-error { color: var(--alert); font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 4px 10px; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { background: #f6f6f6; font-weight: 600; overflow-wrap: normal; }  /* break at spaces */
.severe { color: var(--alert); font-weight: 600; }
.cut { cursor: help; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td ul { margin: 0; padding-left: 18px; }
code { font-size: 13px; }
footer { margin-top: 36px; color: #777; font-size: 12px; }
footer pre { white-space: pre-wrap; font-size: 11px; }
"""


def _page(title: str, body: str, charts: Mapping[str, Any]) -> str:
    scripts = [_static(name) for name in SCRIPTS] + [_RENDER]
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_script_hash(source) for source in scripts),
        "style-src 'unsafe-inline'",  # vega-embed's stylesheet and SVG style attributes
        "img-src data: blob:",  # the PNG/SVG export of vega-embed's menu
        "base-uri 'none'",
        "form-action 'none'",
    ])
    licences = "\n\n".join(f"{name.removesuffix('-LICENSE.txt')}:\n{_static(name)}"
                           for name in LICENCES)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_text(policy)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        body,
        "<footer><details><summary>Made with Vega, Vega-Lite and Vega-Embed (BSD-3-Clause), "
        f"included in this file</summary><pre>{_text(licences)}</pre></details></footer>",
        f'<script type="application/json" id="gradwatch-charts">{script_json(charts)}</script>',
        *(f"<script>{source}</script>" for source in scripts),
        "</body></html>",
    ])


def _base_url(client: Any, tracking_url: str | None) -> str | None:
    """The MLflow UI address for links: `tracking_url`, else the client's tracking URI when it
    is http(s); None (no links) otherwise. Credentials, query and fragment are dropped."""
    given = tracking_url is not None
    candidate = tracking_url if given else str(getattr(client, "tracking_uri", "") or "")
    parts = urlsplit(candidate or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        if given:
            raise ConfigError(
                f"tracking_url must be the http(s) address of the MLflow UI, e.g. "
                f"'http://mlflow.example:5000', got {tracking_url!r}. Leave it out for no "
                f"links to MLflow."
            )
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"

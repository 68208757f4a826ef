"""The HTML run report and experiment dashboard, built from runs on a real `mlflow server`
written in the documented layout: what they show, that user-controlled names cannot break out
of the page, that nothing is loaded from the network, and that logging a report leaves the
run's status, params and tags alone. (Rendering in a real browser: test_dashboard_browser.py.)"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from gradwatch import ConfigError, InputError
from gradwatch.dashboard.report import (
    build_experiment_dashboard,
    build_run_report,
    log_run_report,
    render_run_png,
    script_json,
)
from gradwatch.record.layout import REPORT_HTML, REPORT_PNG
from tests.support.dashboard_runs import (
    EVIL_LAYER,
    EVIL_RUN,
    LONG_LAYERS,
    a_run_with_everything,
    a_run_with_long_names,
    element,
    new_experiment,
    report,
    write_run,
)
from tests.support.mlflow_server import MlflowServer

#: Attributes that would make a browser fetch or open something.
URL_ATTRIBUTE = re.compile(r"""\b(?:src|href|action|data|poster|srcset)\s*=\s*["']?([^"'\s>]+)""",
                           re.IGNORECASE)
CHART_DATA = re.compile(
    r'<script type="application/json" id="gradwatch-charts">(.*?)</script>', re.DOTALL)


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


def chart_data(page: str) -> dict[str, Any]:
    (text,) = CHART_DATA.findall(page)
    assert not {"<", ">", "&", "\u2028", "\u2029"} & set(text)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the chart data")

    loaded: dict[str, Any] = json.loads(text, parse_constant=refuse)
    return loaded


def table_rows(page: str) -> list[str]:
    """The body rows of the page's first table."""
    return page.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]


def outside_scripts(page: str) -> str:
    return re.sub(r"(?s)<script\b[^>]*>.*?</script>", "<script></script>", page)


def assert_offline(page: str, *, allowed_prefix: str | None = None) -> None:
    """No attribute loads or links anything absolute, except links to the MLflow UI."""
    for value in URL_ATTRIBUTE.findall(page):
        if allowed_prefix and html.unescape(value).startswith(allowed_prefix + "/#/"):
            continue
        assert not re.match(r"(?i)(https?:)?//|file:|ftp:", html.unescape(value)), value
    assert not re.search(r"(?i)<link\b", page)
    assert not re.search(r"(?i)@import|url\(\s*['\"]?(https?:)?//", page)
    assert re.search(r"""<meta http-equiv="Content-Security-Policy" content="default-src """
                     r"""&#x27;none&#x27;; script-src &#x27;sha256-""", page)


def test_run_report_shows_the_run_escaped_and_offline(client: MlflowClient,
                                                      mlflow_server: MlflowServer) -> None:
    experiment_id, run_id = a_run_with_everything(client)
    page = build_run_report(client, run_id, worst_checks=3)

    # user-controlled names only as escaped text, and intact in the chart data
    assert EVIL_LAYER not in page and EVIL_RUN not in page
    assert "<img" not in outside_scripts(page)  # (vega-embed's tooltip code has one)
    assert html.escape(EVIL_RUN) in page and html.escape(EVIL_LAYER) in page
    assert page.count("</script>") == 5  # the chart data + vega, vega-lite, vega-embed, ours
    charts = chart_data(page)
    layers = [row["layer"] for row in charts["chart-layers"]["datasets"]["layers"]]
    assert layers == ["encoder.weight", EVIL_LAYER, "head.bias"]  # names from the artifact

    # the overall distance, with the error check's NaN named, not lost
    checks = {row["step"]: row for row in charts["chart-distance"]["datasets"]["checks"]}
    assert len(checks) == 13
    assert (checks[40]["verdict"], checks[40]["distance"]) == ("alert", 0.25)
    assert (checks[130]["verdict"], checks[130]["distance"], checks[130]["shown_as"]) == (
        "error", None, "NaN")
    cells = charts["chart-layers"]["datasets"]["layer_cells"]
    assert {(c["step_from"], c["distance_text"]) for c in cells
            if c["distance_text"] in ("NaN", "+inf")} == {(50, "+inf"), (130, "NaN")}

    # tables: the worst elements of the latest 3 checks, the layers that alerted
    assert "for the latest 3 of 13 checks (steps 110–130)" in page
    assert "step 40" not in page.split("Worst elements")[1].split("Settings")[0]
    assert "<td>gradwatch.threshold.alert</td><td>0.001</td>" in page
    alerted = page.split("Layers that reached the alert threshold")[1]
    assert html.escape(EVIL_LAYER) in alerted and "+inf" in alerted

    # the run's MLflow page, from the client's http tracking URI; nothing else absolute
    link = f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}"
    assert f'<a href="{link}">' in page
    assert_offline(page, allowed_prefix=mlflow_server.url)


def test_worst_elements_of_every_check_when_there_are_few(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    worst = {"w": [element((3,), 1.0, -1.0), element((4,), 0.5, 0.5, kink=True)]}
    run_id = write_run(client, experiment_id, [(7, report({"w": 1.0}, worst=worst))])
    page = build_run_report(client, run_id, tracking_url="https://mlflow.example/prefix/")
    assert "for all 1 checks (step 7)" in page
    table = page.split("Worst elements")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows] == [
        ["7", "w", "[3]", "1", "-1", "2", '<span class="severe">1</span>', ""],
        ["7", "w", "[4]", "0.5", "0.5", "0", "0", "yes"],
    ]
    assert f'href="https://mlflow.example/prefix/#/experiments/{experiment_id}/runs/' in page


def test_long_layer_names_keep_their_end_and_show_in_full_on_hover(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    page = build_run_report(client, a_run_with_long_names(client, experiment_id))
    worst = page.split("<h2>Worst elements</h2>")[1].split("</table>")[0]
    lora = LONG_LAYERS[3]  # 71 characters: cut at a dot, keeping ".lora_A.default.weight"
    cut = (f'<td><span class="cut" title="{lora}">'
           f'…model.layers.31.self_attn.q_proj.lora_A.default.weight</span></td>')
    assert worst.count(cut) == 10  # one worst element of it per check
    assert outside_scripts(page).count(lora) == outside_scripts(page).count(f'title="{lora}"')
    assert f"<td>{LONG_LAYERS[0]}</td>" in worst  # 55 characters: shown whole
    assert f"<td>{LONG_LAYERS[1]}</td>" in page.split("Layers that reached")[1]

    # the heatmap's colours and legend are the thresholds', and the page says so
    scale = chart_data(page)["chart-layers"]["encoding"]["color"]["scale"]
    assert scale["domain"][-3:] == ["warn 1e-5 – 1e-3", "alert ≥ 1e-3", "NaN / ±inf"]
    assert scale["range"][-3:] == ["#f2a900", "#d62728", "#000000"]
    assert "blue-grey below warn (1e-5), darker per decade; amber from warn; red from alert " \
           "(1e-3); black: NaN or ±inf" in page


def test_a_run_without_checks_gets_a_page_without_charts(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = write_run(client, experiment_id, [])
    page = build_run_report(client, run_id)
    assert "No checks yet" in page and chart_data(page) == {}
    assert "No check artifacts" in page


def test_unknown_runs_experiments_and_bad_urls_are_explained(client: MlflowClient) -> None:
    with pytest.raises(InputError, match=r"run_id: no MLflow run '0123abcd' at http://"):
        build_run_report(client, "0123abcd")
    name, _ = new_experiment(client)
    with pytest.raises(ConfigError, match=rf"no active MLflow experiment .*'nope-{name}'.*"
                                          rf"known: .*'{name}'"):
        build_experiment_dashboard(client, f"nope-{name}")
    _, experiment_id = new_experiment(client)
    run_id = write_run(client, experiment_id, [(1, report({"w": 1e-9}))])
    for bad in ("ftp://host/", "javascript:alert(1)", "mlflow.example:5000", ""):
        with pytest.raises(ConfigError, match="tracking_url must be the http"):
            build_run_report(client, run_id, tracking_url=bad)
    page = build_run_report(client, run_id, tracking_url="http://user:secret@[::1]:5000?x=1#y")
    assert "secret" not in page and 'href="http://[::1]:5000/#/experiments/' in page
    with pytest.raises(ConfigError, match="worst_checks must be an int"):
        build_run_report(client, run_id, worst_checks=-1)


def test_experiment_dashboard_lists_runs_links_and_alerted_layers(
    client: MlflowClient, mlflow_server: MlflowServer
) -> None:
    name, experiment_id = new_experiment(client)
    calm = write_run(client, experiment_id, [(10, report({"a": 1e-9, "b": 1e-9})),
                                             (20, report({"a": 1e-9, "b": 2e-9}))], name="calm")
    # b reaches 0.01: an alert for the default threshold, not for this run's 0.05
    tolerant = write_run(client, experiment_id, [(10, report({"a": 1e-9, "b": 0.01}))],
                         name="tolerant", alert_threshold=0.05)
    noisy = write_run(client, experiment_id,
                      [(10, report({"a": 1e-9, EVIL_LAYER: 0.3})),
                       (20, report({"a": math.nan, EVIL_LAYER: 1e-9}, verdict="error"))],
                      name=EVIL_RUN)
    client.create_run(experiment_id, run_name="not-gradwatch")  # no gradwatch.every: left out

    page = build_experiment_dashboard(client, name, tracking_url="http://ui.example:5000")
    rows = dict(zip((calm, tolerant, noisy), table_rows(page)))
    assert len(table_rows(page)) == 3 and "not-gradwatch" not in page
    for run_id, row in rows.items():
        link = f"http://ui.example:5000/#/experiments/{experiment_id}/runs/{run_id}"
        assert f'<a href="{link}" target="_blank" rel="noopener noreferrer">' in row
    assert 'class="badge v-ok">ok<' in rows[calm] and "<td>none</td>" in rows[calm]
    assert "<td>none</td>" in rows[tolerant]
    assert 'class="badge v-error">error<' in rows[noisy]
    assert f"{html.escape(EVIL_RUN)} ({noisy[:8]})" in rows[noisy]
    assert re.search(rf"<li>{re.escape(html.escape(EVIL_LAYER))} <small>from step 10, worst "
                     rf"0.3</small></li><li>a <small>from step 20, worst NaN", rows[noisy])
    assert EVIL_LAYER not in page and EVIL_RUN not in page
    assert_offline(page, allowed_prefix="http://ui.example:5000")

    lines = chart_data(page)["chart-runs"]["datasets"]["run_checks"]
    assert {row["run_id"] for row in lines} == {calm, tolerant, noisy}
    assert len(table_rows(build_experiment_dashboard(client, experiment_id))) == 3  # by id
    quick = build_experiment_dashboard(client, experiment_id, layers=False)
    assert "layers that ever alerted" not in quick and "were not read" in quick
    assert len(table_rows(quick)) == 3 and "worst 0.3" not in quick


def test_log_run_report_writes_artifacts_and_nothing_else(client: MlflowClient,
                                                          tmp_path: Path) -> None:
    _, experiment_id = new_experiment(client)
    run_id = write_run(client, experiment_id, [(10, report({"a": 1e-9})),
                                               (20, report({"a": 0.1}))])
    client.set_terminated(run_id, "FINISHED")
    before = client.get_run(run_id)
    assert log_run_report(client, run_id, png=True) == [REPORT_HTML, REPORT_PNG]
    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    assert (after.data.params, after.data.tags, after.data.metrics) == (
        before.data.params, before.data.tags, before.data.metrics)
    listed = {info.path for info in client.list_artifacts(run_id, "gradwatch")}
    assert {REPORT_HTML, REPORT_PNG} <= listed
    local = Path(client.download_artifacts(run_id, REPORT_HTML, str(tmp_path)))
    assert "<title>gradwatch report: train</title>" in local.read_text(encoding="utf-8")
    png = Path(client.download_artifacts(run_id, REPORT_PNG, str(tmp_path))).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_render_run_png_leaves_matplotlib_global_state_alone(client: MlflowClient,
                                                            tmp_path: Path) -> None:
    import matplotlib

    _, experiment_id = new_experiment(client)
    layers = {f"layer{i}.weight": 1e-9 * (i + 1) for i in range(12)}
    run_id = write_run(client, experiment_id, [
        (step, report({**layers, "layer7.weight": 0.2 if step == 30 else 1e-9,
                       "layer8.weight": math.nan if step == 40 else 1e-9}))
        for step in range(10, 60, 10)], name="$x^2$ {braces}")
    backend, params = matplotlib.get_backend(), dict(matplotlib.rcParams)
    path = render_run_png(client, run_id, tmp_path / "report.png")
    assert path == tmp_path / "report.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1100 and height > 600  # 11 in × 100 dpi; the heatmap makes it taller
    assert matplotlib.get_backend() == backend and dict(matplotlib.rcParams) == params


def test_script_json_cannot_close_the_script_element() -> None:
    text = script_json({"name": EVIL_LAYER + "\u2028&<!--"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"name": EVIL_LAYER + "\u2028&<!--"}
    with pytest.raises(ValueError):
        script_json({"x": math.nan})


def a_run_with_training_kernels(client: MlflowClient) -> str:
    """Real checks by the record's writer: clean (10), a custom op wrong outside float64
    (20, 30), the kernels measurement failed (40), clean again (50)."""
    from tests.record.kernel_runs import kernel_error_report, kernel_report

    _, experiment_id = new_experiment(client)
    good, bad = kernel_report(faulty=False), kernel_report(faulty=True)
    checks = [(10, good), (20, bad), (30, bad), (40, kernel_error_report()), (50, good)]
    return write_run(client, experiment_id, checks, name="bf16-op")


def test_a_run_with_training_kernels_shows_its_ratio_and_layers(
    client: MlflowClient, mlflow_server: MlflowServer
) -> None:
    page = build_run_report(client, a_run_with_training_kernels(client))
    charts = chart_data(page)
    spec = charts["chart-precision"]
    rows = {row["step"]: row for row in spec["datasets"]["checks"]}
    assert sorted(rows) == [10, 20, 30, 40, 50]
    assert [rows[s]["verdict"] for s in sorted(rows)] == ["ok", "alert", "alert", "error", "ok"]
    assert rows[20]["ratio"] > 1e3 and rows[10]["ratio"] < 8
    assert rows[40]["shown_as"] == "error"
    assert spec["layer"][0]["encoding"]["y"]["scale"] == {"type": "log"}
    assert [t["value"] for t in spec["datasets"]["thresholds"]] == [12.0, 32.0]
    assert spec["datasets"]["alert_periods"] == [
        {"step_from": 20, "step_to": 50, "verdict": "error", "checks": 3}]
    # the definition's chart is still the distance, clean throughout
    assert all(row["distance"] < 1e-6 for row in charts["chart-distance"]["datasets"]["checks"])

    section = page.split("<h2>Training kernels (precision)</h2>")[1].split("<h2>")[0]
    assert "float32" in section and "gwmon::tanh" in section  # how the newest one ran
    assert "warn 12 and alert 32" in section
    body = section.split("<tbody>")[1].split("</tbody>")[0]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body.split("<tr>")[1:]]
    by_layer = {row[0]: row[1:] for row in cells}
    assert list(by_layer) == ["first.weight", "first.bias", "second.weight", "second.bias"]
    latest, latest_step, worst, worst_step, count = by_layer["first.weight"]
    assert (latest_step, worst_step, count) == ("50", "20", "2 of 4")  # step 40: no ratio
    assert worst.startswith('<span class="severe">') and "severe" not in latest
    assert by_layer["second.weight"][4] == "0 of 4"
    cards = page.split('<section class="cards">')[1].split("</section>")[0]
    assert "training kernels" in cards and "at step 50" in cards
    assert "includes the training-kernels measurement" in page  # under the distance chart
    assert_offline(page, allowed_prefix=mlflow_server.url)


def test_a_run_without_training_kernels_shows_nothing_new(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = write_run(client, experiment_id, [(10, report({"w": 1e-9}))])
    page = build_run_report(client, run_id)
    assert "chart-precision" not in chart_data(page)
    assert "Training kernels" not in page and "training kernels" not in page
    assert "training-kernels" not in outside_scripts(page)


def test_the_png_of_a_run_with_training_kernels_has_the_ratio(client: MlflowClient,
                                                               tmp_path: Path) -> None:
    from PIL import Image

    path = render_run_png(client, a_run_with_training_kernels(client), tmp_path / "r.png")
    with Image.open(path) as image:
        assert image.height > 640  # distance, heatmap and the ratio (3 × ~2.8 in at 100 dpi)

"""The dashboards in a real browser: headless Chromium, driven over the DevTools protocol,
opens the run report and the experiment dashboard from file:// and the logged report inside
the MLflow UI's artifact view (a sandboxed iframe), and finds the charts drawn, no console
error, no exception, no script run from a name, and a screenshot worth looking at."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gradwatch._dashboard import (
    REPORT_HTML,
    build_experiment_dashboard,
    build_run_report,
    log_run_report,
)
from tests.browser import Chromium, Frame, Page, chromium_path
from tests.dashboard_runs import EVIL_LAYER, EVIL_RUN, a_run_with_everything, report, write_run
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="needs a Chromium binary (/usr/bin/chromium, chromium on PATH, or "
           "$GRADWATCH_CHROMIUM); CI installs it with apt-get install chromium",
)

RENDERED = "document.body !== null && document.body.dataset.rendered === 'true'"
FAILED = "document.body !== null && document.body.dataset.renderError"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium.launch(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


@pytest.fixture
def page(browser: Chromium) -> Iterator[Page]:
    tab = browser.new_page()
    try:
        yield tab
    finally:
        tab.close()


def open_file(page: Page, path: Path) -> None:
    page.navigate(path.as_uri())
    page.wait_for(RENDERED, timeout=30, fail_if=FAILED)


def count(target: Page | Frame, selector: str) -> int:
    return int(target.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))


def assert_screenshot(page: Page, path: Path) -> None:
    from PIL import Image  # matplotlib's dependency, so always there with mlflow

    data = page.screenshot(path)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 30_000
    with Image.open(path) as image:
        assert image.size[0] == 1280 and image.size[1] > 600
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # charts, not a blank page


def no_dialogs(page: Page) -> bool:
    return not page.events(lambda e: e["method"] == "Page.javascriptDialogOpening")


def test_run_report_renders_from_a_file(client: MlflowClient, page: Page,
                                        tmp_path: Path) -> None:
    _, run_id = a_run_with_everything(client)
    path = tmp_path / "report.html"
    path.write_text(build_run_report(client, run_id), encoding="utf-8")
    open_file(page, path)
    assert page.errors() == []
    assert count(page, "#chart-distance.vega-embed svg.marks") == 1
    assert count(page, "#chart-layers.vega-embed svg.marks") == 1
    assert count(page, "#chart-worst.vega-embed svg.marks") == 1
    cells = page.evaluate("Array.from(document.querySelectorAll('#chart-worst g.mark-text "
                          "text')).map(t => [t.textContent, t.getAttribute('fill')])")
    assert [EVIL_LAYER, "#222222"] in cells  # the worst elements' layer, as text
    assert ["0.333", "#d62728"] in cells  # |1 - 2| / 3 ≥ the alert threshold: red
    assert count(page, "#chart-distance g.mark-symbol.role-mark path") == 13  # one point per check
    assert count(page, "#chart-layers g.mark-rect.role-mark path") == 3 * 13  # 3 layers × 13 checks
    black = page.evaluate("Array.from(document.querySelectorAll('#chart-layers g.mark-rect"
                          ".role-mark path')).filter(p => p.getAttribute('fill') === '#000000')"
                          ".length")
    assert black == 4  # NaN in 3 layers at step 130, +inf in one at step 50
    # the names are text on the page, never markup
    assert page.evaluate("document.title") == f"gradwatch report: {EVIL_RUN}"
    labels = page.evaluate("Array.from(document.querySelectorAll('#chart-layers text'))"
                           ".map(t => t.textContent)")
    assert EVIL_LAYER in labels
    assert count(page, "img") == 0 and no_dialogs(page)
    assert_screenshot(page, tmp_path / "report.png")


def test_experiment_dashboard_renders_from_a_file(client: MlflowClient, page: Page,
                                                  tmp_path: Path) -> None:
    experiment_id, noisy = a_run_with_everything(client)
    calm = write_run(client, experiment_id, [(step, report({"a": 1e-9 * step}))
                                             for step in range(10, 200, 10)], name="calm")
    path = tmp_path / "dashboard.html"
    path.write_text(build_experiment_dashboard(client, experiment_id,
                                               tracking_url="http://mlflow.invalid:5000"),
                    encoding="utf-8")
    open_file(page, path)
    assert page.errors() == []
    assert count(page, "#chart-runs.vega-embed svg.marks") == 1
    assert count(page, "#chart-runs g.mark-line.role-mark path") == 2  # one line per run
    links = page.evaluate("Array.from(document.querySelectorAll('td a'))"
                          ".map(a => [a.href, a.target, a.rel])")
    base = f"http://mlflow.invalid:5000/#/experiments/{experiment_id}/runs/"
    assert links == [[base + noisy, "_blank", "noopener noreferrer"],
                     [base + calm, "_blank", "noopener noreferrer"]]
    assert count(page, "img") == 0 and no_dialogs(page)
    assert_screenshot(page, tmp_path / "dashboard.png")


def test_logged_report_renders_in_the_mlflow_artifact_view(
    client: MlflowClient, mlflow_server: MlflowServer, page: Page, tmp_path: Path
) -> None:
    experiment_id, run_id = a_run_with_everything(client)
    log_run_report(client, run_id)
    page.auto_attach()
    # MLflow 3.x's route for a run's artifact (Routes.getRunPageRoute with an artifact path);
    # the UI shows an .html artifact in <iframe sandbox="allow-scripts" src="blob:...">
    page.navigate(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}"
                  f"/artifacts/{REPORT_HTML}")
    frame = page.iframe(timeout=45)
    frame.wait_for(RENDERED, timeout=30, fail_if=FAILED)
    assert frame.errors() == []
    assert frame.evaluate("document.title") == f"gradwatch report: {EVIL_RUN}"
    assert count(frame, ".vega-embed svg.marks") == 3  # distance, layers, worst elements
    assert count(frame, "#chart-layers g.mark-rect.role-mark path") == 3 * 13
    assert count(frame, "img") == 0 and no_dialogs(page)
    page.evaluate("document.querySelector('iframe').scrollIntoView()")
    assert_screenshot(page, tmp_path / "mlflow-artifact-view.png")

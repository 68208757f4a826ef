"""The dashboards in a real browser: headless Chromium, driven over the DevTools protocol,
opens the run report and the experiment dashboard from file:// and the logged report inside
the MLflow UI's artifact view (a sandboxed iframe), and finds the charts drawn, no console
error, no exception, no script run from a name, and a screenshot worth looking at."""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from gradwatch.dashboard.report import (
    build_experiment_dashboard,
    build_run_report,
    log_run_report,
)
from gradwatch.record.layout import REPORT_HTML
from tests.support.browser import Chromium, Frame, Page, chromium_path
from tests.support.dashboard_runs import (
    EVIL_LAYER,
    EVIL_RUN,
    LONG_LAYERS,
    a_run_with_everything,
    a_run_with_long_names,
    report,
    write_run,
)
from tests.support.mlflow_runs import new_experiment
from tests.support.mlflow_server import MlflowServer

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


#: Every piece of text in a table cell (one box per line of each text node) and every SVG text
#: of the charts that is drawn (Vega hides overlapping axis labels with opacity 0), with its
#: page coordinates; `owner` tells the boxes of one text apart from another's, and `clipped`
#: marks a chart text that reaches outside its SVG (cut off, as a legend taller than its chart
#: would be).
TEXT_BOXES = """(() => {
  const shown = el => el.checkVisibility({opacityProperty: true, visibilityProperty: true});
  const boxes = [];
  let owner = 0;
  const add = (kind, text, rects, clipped) => {
    owner += 1;
    for (const r of rects) {
      if (r.width > 0 && r.height > 0) {
        boxes.push({kind, owner, clipped, text: text.trim().slice(0, 80), left: r.left + scrollX,
                    right: r.right + scrollX, top: r.top + scrollY, bottom: r.bottom + scrollY});
      }
    }
  };
  for (const cell of document.querySelectorAll("table th, table td")) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.textContent.trim() || !shown(node.parentElement)) continue;
      const range = document.createRange();
      range.selectNodeContents(node);
      add("table", node.textContent, range.getClientRects(), false);
    }
  }
  for (const text of document.querySelectorAll(".chart svg text")) {
    if (text.textContent.trim() && shown(text)) {
      const r = text.getBoundingClientRect(), svg = text.ownerSVGElement.getBoundingClientRect();
      add("chart", text.textContent, [r], r.left < svg.left - 1 || r.right > svg.right + 1 ||
                                          r.top < svg.top - 1 || r.bottom > svg.bottom + 1);
    }
  }
  return boxes;
})()"""

#: The words of table headers that the browser broke across two lines.
BROKEN_HEADER_WORDS = """(() => {
  const broken = [];
  for (const th of document.querySelectorAll("th")) {
    const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const word of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, word.index);
        range.setEnd(node, word.index + word[0].length);
        if (range.getClientRects().length > 1) broken.push(word[0]);
      }
    }
  }
  return broken;
})()"""


def overlapping(boxes: list[dict[str, Any]], *, tolerance: float = 1.0) -> list[str]:
    """Each pair of text boxes of different texts that overlap by more than `tolerance` px
    both ways (a shared edge, or anti-aliasing, is not an overlap)."""
    ordered = sorted(boxes, key=lambda box: box["top"])
    found = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b["top"] >= a["bottom"] - tolerance:
                break
            if a["owner"] == b["owner"]:
                continue
            width = min(a["right"], b["right"]) - max(a["left"], b["left"])
            height = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"])
            if width > tolerance and height > tolerance:
                found.append(f"{a['kind']} {a['text']!r} and {b['kind']} {b['text']!r}: "
                             f"{width:.0f} x {height:.0f} px")
    return found


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


def hue(colour: str) -> float:
    """The hue in degrees of "#rrggbb"."""
    red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(red, green, blue)[0] * 360


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
    cells = page.evaluate("Array.from(document.querySelectorAll('td')).map(td => "
                          "[td.textContent, getComputedStyle(td.firstElementChild || td).color])")
    assert [EVIL_LAYER, "rgb(34, 34, 34)"] in cells  # the worst elements' layer, as text
    assert ["0.333", "rgb(214, 39, 40)"] in cells  # |1 - 2| / 3 ≥ the alert threshold: red
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
    strokes = page.evaluate("Array.from(document.querySelectorAll('#chart-runs g.mark-line"
                            ".role-mark path')).map(p => p.getAttribute('stroke'))")
    (noisy_hue, calm_hue) = (hue(colour) for colour in strokes)
    assert min(abs(noisy_hue - calm_hue), 360 - abs(noisy_hue - calm_hue)) >= 60, strokes
    # the alert checks (step 40, and the +inf layer at step 50) are red points, the NaN error
    # (step 130) a purple one; the calm run has none
    fills = page.evaluate("Array.from(document.querySelectorAll('#chart-runs g.mark-symbol"
                          ".role-mark path')).map(p => p.getAttribute('fill'))")
    assert sorted(fills) == ["#6a3d9a", "#d62728", "#d62728"]
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
    assert count(frame, ".vega-embed svg.marks") == 2  # distance, layers
    assert count(frame, "#chart-layers g.mark-rect.role-mark path") == 3 * 13
    assert count(frame, "img") == 0 and no_dialogs(page)
    page.evaluate("document.querySelector('iframe').scrollIntoView()")
    assert_screenshot(page, tmp_path / "mlflow-artifact-view.png")


def test_no_text_overlaps_in_the_tables_and_charts_of_both_pages_at_1400_px(
    client: MlflowClient, page: Page, tmp_path: Path
) -> None:
    _, experiment_id = new_experiment(client, "long")
    run_id = a_run_with_long_names(client, experiment_id)
    write_run(client, experiment_id, [(step, report({LONG_LAYERS[0]: 1e-9 * step}))
                                      for step in range(10, 200, 10)], name="calm")
    page.command("Emulation.setDeviceMetricsOverride",
                 {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    pages = {"report": build_run_report(client, run_id),
             "dashboard": build_experiment_dashboard(client, experiment_id)}
    for name, text in pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(text, encoding="utf-8")
        open_file(page, path)
        assert page.errors() == []
        assert page.evaluate("document.documentElement.clientWidth") == 1400
        boxes = page.evaluate(TEXT_BOXES)
        shown = " ".join(box["text"] for box in boxes)
        # the test measures what it should: the long names, in tables and chart labels
        assert LONG_LAYERS[1] in shown
        assert sum(box["kind"] == "chart" for box in boxes) > 20
        assert sum(box["kind"] == "table" for box in boxes) > 20
        assert overlapping(boxes) == [], name
        assert [box["text"] for box in boxes if box["clipped"]] == [], name
        assert page.evaluate(BROKEN_HEADER_WORDS) == [], name
    # the report's cut name keeps its end, in the table (in full on hover) and in the heatmap
    open_file(page, tmp_path / "report.html")
    kept = "…model.layers.31.self_attn.q_proj.lora_A.default.weight"
    cut = page.evaluate(f"Array.from(document.querySelectorAll('td span[title]')).filter(s => "
                        f"s.title === {json.dumps(LONG_LAYERS[3])}).map(s => s.textContent)")
    assert cut and set(cut) == {kept}
    labels = page.evaluate("Array.from(document.querySelectorAll('#chart-layers text'))"
                           ".map(t => t.textContent)")
    assert kept in labels and LONG_LAYERS[0] in labels


def test_the_training_kernels_chart_and_table_render_without_overlaps(
    client: MlflowClient, page: Page, tmp_path: Path
) -> None:
    from tests.dashboard.test_dashboard_html import a_run_with_training_kernels

    path = tmp_path / "kernels.html"
    path.write_text(build_run_report(client, a_run_with_training_kernels(client)),
                    encoding="utf-8")
    page.command("Emulation.setDeviceMetricsOverride",
                 {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    open_file(page, path)
    assert page.errors() == []
    assert count(page, "#chart-precision.vega-embed svg.marks") == 1
    assert count(page, "#chart-precision g.mark-symbol.role-mark path") == 5  # one per check
    ticks = page.evaluate("Array.from(document.querySelectorAll('#chart-precision text'))"
                          ".map(t => t.textContent)")
    assert "training-kernels ratio" in ticks
    boxes = page.evaluate(TEXT_BOXES)
    assert overlapping(boxes) == []
    assert [box["text"] for box in boxes if box["clipped"]] == []
    assert page.screenshot(tmp_path / "kernels.png").startswith(b"\x89PNG")

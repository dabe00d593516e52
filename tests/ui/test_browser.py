"""What a person sees, in a real headless Chromium (Debian's ``chromium``, driven over the
DevTools protocol): the release report renders with every image loaded, and the MLflow UI
started by ``unlearn ui`` shows the registered model with its champion alias. Screenshots
are kept (their paths are printed at the end of the run).

Slow: a release state, a browser, and an MLflow server with its 4 MB JS app, on 2 cores.
"""

from __future__ import annotations

import io
import signal
import urllib.request

import pytest
from flow_helpers import cli
from ui_helpers import UiProcess, free_port

from flows.render.report import SECTIONS

pytestmark = [pytest.mark.slow, pytest.mark.flow,
              pytest.mark.usefixtures("chromium_available")]  # fail before any setup

IMAGES_LOADED = """(() => {
  const imgs = [...document.images];
  return {total: imgs.length,
          loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          visible: imgs.filter(i => i.getBoundingClientRect().width > 0).length};
})()"""


def _not_blank(png: bytes, min_height: int = 600) -> bool:
    """A real page: many distinct colours (text, images), not one flat fill."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 20) or []) > 50 and img.size[1] >= min_height


def test_report_renders_in_a_browser(release_home, browser, screenshot_dir, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(release_home))
    report = screenshot_dir / "report-v2.html"
    rc, _, err = cli("report", "2", "--output", str(report))
    assert rc == 0, err
    browser.goto(report.as_uri())
    title = browser.eval("document.title")
    assert title == "forget-classifier version 2: release report"
    images = browser.eval(IMAGES_LOADED)
    assert images["total"] >= 2 + 6 + 12  # figures, forget thumbnails, 4 x 3 adversarial
    assert images["loaded"] == images["total"] == images["visible"], images
    headings = browser.eval("[...document.querySelectorAll('section h2')].map(h => h.innerText)")
    assert headings == [title for _, title in SECTIONS]
    text = browser.text()
    for expected in ("@champion", "Verdict:", "objective_reached", "erase-11", "fix-555",
                     "Ancestry (newest first)", "target reached"):
        assert expected in text, expected
    shot = browser.screenshot(screenshot_dir / "report-v2.png")
    assert _not_blank(shot.read_bytes(), min_height=2000)  # the whole page
    print(f"report screenshot: {shot}")


def test_mlflow_ui_shows_the_champion(release_home, browser, screenshot_dir, tmp_path):
    from mlflow import MlflowClient

    from tasks.paths import Paths

    client = MlflowClient(Paths(release_home).tracking_uri)
    champion = int(client.get_model_version_by_alias("forget-classifier", "champion").version)
    other = 1 if champion != 1 else 2
    ui = UiProcess(release_home, tmp_path / "prefect", "--only", "mlflow",
                   "--mlflow-port", str(free_port()))
    try:
        base = ui.urls["mlflow"]
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            assert r.read().strip() == b"OK"
        browser.goto(ui.urls["mlflow_model"])  # the registered model's page
        browser.wait_for("document.body.innerText.includes('champion')", 120,
                         "the champion alias on the model page")
        assert "forget-classifier" in browser.text()
        browser.screenshot(screenshot_dir / "mlflow-model.png", full_page=False)

        def version_page(version: int) -> str:
            browser.goto(f"{base}/#/models/forget-classifier/versions/{version}")
            browser.wait_for(f"document.body.innerText.includes('Version {version}') && "
                             "document.body.innerText.includes('weights_sha256')", 120,
                             f"version {version} with its lineage tags")
            return browser.text()

        other_text = version_page(other)
        assert "champion" not in other_text  # the alias sits on one version only
        text = version_page(champion)
        assert "champion" in text and "parent_version" in text
        shot = browser.screenshot(screenshot_dir / f"mlflow-version-{champion}.png",
                                  full_page=False)
        assert _not_blank(shot.read_bytes())
        print(f"MLflow UI screenshots: {screenshot_dir}")
    finally:
        rc = ui.stop(signal.SIGTERM)
    assert rc == 0, ui.stderr()

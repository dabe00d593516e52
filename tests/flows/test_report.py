"""``unlearn report``: one self-contained HTML page per version, logged to its MLflow run.

One small state for the module (version 1 pretrain, version 2 one mixed batch); the page is
checked as data (sections, embedded PNGs, no external URL, one row per forget instance), not
in a browser (that is tests/ui/test_browser.py).
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from flow_helpers import cli, cli_json
from release_state import build_release_state

from flows.cli import main
from flows.render.report import SECTIONS, render_html
from tasks.paths import Paths
from tasks.report import lineage_chain
from unlearning.analysis import per_class_accuracy, score_distributions

pytestmark = pytest.mark.flow


class Page(HTMLParser):
    """Section ids, image sources, links, table rows by section: what the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: dict[str, int] = {}
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("a", "link"):
            self.links.append(a.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr" and self.sections:
            self.rows[self.sections[-1]] = self.rows.get(self.sections[-1], 0) + 1


def parse(path: Path) -> tuple[Page, str]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return page, text


@pytest.fixture(scope="module")
def state(tmp_path_factory, prefect_server, write_params):
    root = tmp_path_factory.mktemp("report-state")
    write_params(root)
    built = build_release_state(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        yield {"paths": Paths(root), **built}


def test_report_of_a_release(state, tmp_path):
    out = tmp_path / "v2.html"
    rc, stdout, stderr = cli("report", "2", "--output", str(out))
    assert rc == 0, stderr
    assert str(out) in stdout and "logged to runs:/" in stdout
    page, text = parse(out)
    assert page.sections == [sid for sid, _ in SECTIONS]
    assert page.scripts == 0
    # self-contained: every image an embedded PNG, every link an in-page anchor
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(href.startswith("#") for href in page.links)
    assert not re.search(r"""(src|href)=["']?(https?:|file:|//)""", text)
    # one row (plus header) per forget instance, each named by id and request
    rows = state["rows"]
    assert page.rows["forget"] == 1 + len(rows)  # no earlier batches: no second table
    for r in rows:
        assert f">{r['instance_id']}<" in text and r["request_id"] in text
    assert page.rows["per-class"] == 1 + 10
    assert page.rows["adversarial"] == 1 + 4
    # objective, held-out drop vs the parent, drop since the base, earlier deletions, finite
    assert page.rows["gates"] == 1 + 5
    assert "parent_version" in text and "weights_sha256" in text
    # figures: per-class bars and the MIA distributions; thumbnails for instances and PGD
    assert len(page.images) >= 2 + len(rows) + 3 * 4


def test_report_is_logged_to_the_version_run(state, tmp_path):
    from mlflow import MlflowClient

    rc, result = cli_json("report", "2", "--output", str(tmp_path / "r.html"))
    assert rc == 0
    assert result["sections"] == [sid for sid, _ in SECTIONS]
    assert result["artifact"].endswith("/report/release-report.html")
    paths = state["paths"]
    client = MlflowClient(paths.tracking_uri)
    run_id = client.get_model_version("forget-classifier", "2").run_id
    assert result["artifact"] == f"runs:/{run_id}/report/release-report.html"
    logged = client.download_artifacts(run_id, "report/release-report.html", str(tmp_path))
    assert Path(logged).read_text() == (tmp_path / "r.html").read_text()


def test_report_of_the_base_model(state, tmp_path):
    out = tmp_path / "v1.html"
    rc, result = cli_json("report", "1", "--output", str(out), "--no-log")
    assert rc == 0 and result["artifact"] is None and result["gates_passed"]
    _, text = parse(out)
    assert "No forget instances" in text and "not gated" in text
    assert "No adversarial examples" in text


def test_unknown_version_is_a_one_line_usage_error(state):
    rc, out, err = cli("report", "99")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "unlearn report: error: model 'forget-classifier' has no version 99"]


def test_report_without_registry_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    rc, _, err = cli("report", "1")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "unlearn pretrain" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_quiet_with_json(state, tmp_path):
    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), _Terminal()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
        return rc, out.getvalue(), err.getvalue()

    rc, _, err = run("report", "2", "--output", str(tmp_path / "a.html"), "--no-log")
    assert rc == 0 and "\rreport v2 [" in err
    rc, out, err = run("report", "2", "--output", str(tmp_path / "b.html"), "--no-log", "--json")
    assert rc == 0 and err == "" and out.lstrip().startswith("{")


# -- the pure pieces --------------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """Predicts the class given by the first pixel (0..9), with confidence ~0.9."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).long().clamp(0, 9)
        return torch.nn.functional.one_hot(cls, 10).float() * 5.0


def test_per_class_accuracy_and_distributions():
    y = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])  # class 0: 1/2, class 1: 2/2, class 2: 0/1
    x = torch.zeros(5, 1, 2, 2)
    x[:, 0, 0, 0] = pred.float() / 10 + 0.01
    acc = per_class_accuracy(FixedLogits(), x, y, 4)
    assert acc == [50.0, 100.0, 0.0, None]
    d = score_distributions(None, FixedLogits(), {"held-out": (x, y)})
    assert set(d["scores"]) == {"release"}
    conf = d["scores"]["release"]["held-out"]["confidence"]
    assert conf.shape == (5,) and np.all((conf > 0) & (conf < 1))
    assert d["summary"]["release"]["held-out"]["n"] == 5


def test_lineage_chain_walks_parents_newest_first():
    def v(n, parent, aliases=()):
        return {"aliases": list(aliases), "metrics": {"test_acc": 90.0 + n},
                "lineage": {"parent_version": parent, "batch_id": f"b{n}", "method": "l2ul",
                            "status": "passed"}}

    versions = {1: v(1, "none"), 2: v(2, "1"), 3: v(3, "2", ["champion"]), 4: v(4, "1")}
    assert [c["version"] for c in lineage_chain(versions, 3)] == [3, 2, 1]
    assert [c["version"] for c in lineage_chain(versions, 4)] == [4, 1]
    assert lineage_chain(versions, 3)[0]["aliases"] == ["champion"]


def test_render_escapes_text_and_embeds_no_script():
    from tasks.report import ReleaseReport

    evil = "<script>alert(1)</script>"
    report = ReleaseReport(
        model=evil, version=7,
        summary={"model": evil, "version": 7, "aliases": ["champion"], "status": "passed",
                 "gates_passed": True, "created": 0, "run_id": "r", "run_name": evil,
                 "parent_version": None, "batches": [], "objective": None, "method": "pretrain",
                 "dataset": "digits", "metrics": {"test_acc": 97.0}, "model_uri": "models:/x/7",
                 "tracking_uri": "sqlite:///x"},
        gates=None, forget=[], forget_total=0, earlier=[],
        per_class={"classes": ["a", "b"], "counts": [1, 1], "parent": [None, None],
                   "release": [100.0, 0.0]},
        distributions={"scores": {"release": {"held-out": {"confidence": np.array([0.9, 0.5]),
                                                           "loss": np.array([0.1, 0.7])}}},
                       "summary": {"release": {"held-out": {"n": 2, "mean_confidence": 0.7,
                                                            "mean_loss": 0.4}}}},
        adversarial=[], adversarial_settings={"count": 0},
        lineage={"tags": {"batch_id": evil}, "chain": [], "promotions": []})
    page = render_html(report)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert page.count("<section") == len(SECTIONS)

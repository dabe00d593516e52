"""The release report: one self-contained HTML page per model version.

``build_report`` gathers the data (``tasks.report.collect_report``), renders it with
``render_html`` (pure: data in, HTML out; plots with matplotlib's Agg backend, every image
embedded as a base64 PNG, no script, no external URL), writes the file and logs it to the
version's MLflow run. Sections, in order: summary, gates, forget instances before/after,
held-out accuracy per class, the membership-inference view, adversarial examples, lineage.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SECTIONS = (
    ("summary", "Summary"),
    ("gates", "Gates"),
    ("forget", "Forget instances: before and after"),
    ("per-class", "Held-out accuracy per class"),
    ("mia", "Membership inference view"),
    ("adversarial", "Adversarial examples"),
    ("lineage", "Lineage"),
)
COLORS = {"forget": "#d62728", "held-out": "#1f77b4", "retain sample": "#7f7f7f",
          "parent": "#9ecae1", "release": "#08519c"}
THUMB_PX = 56

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2327;
  margin:0;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px}
header{background:#102a43;color:#fff;padding:20px 24px}
header h1{margin:0 0 6px;font-size:22px}
header .sub{opacity:.85}
nav{margin-top:10px}
nav a{color:#bcccdc;margin-right:14px;text-decoration:none;font-size:13px}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:16px 20px;
  margin:18px 0}
h2{font-size:18px;margin:0 0 10px}
p.note{color:#52606d;margin:6px 0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e4e7eb;padding:5px 8px;text-align:left;vertical-align:middle}
th{background:#f0f4f8;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;
  font-weight:600;margin-right:4px}
.alias{background:#ffe8a3;color:#5c4400}
.pass{background:#d3f9d8;color:#1b5e20}
.fail{background:#ffd8d8;color:#8a1c1c}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:8px}
.card{border:1px solid #dde2e8;border-radius:6px;padding:8px 12px;min-width:130px}
.card .v{font-size:20px;font-weight:600}
.card .k{font-size:12px;color:#52606d}
img.thumb{image-rendering:pixelated;border:1px solid #cbd2d9;width:56px;height:56px}
img.figure{max-width:100%;height:auto}
.bar{display:inline-block;height:8px;background:#08519c;vertical-align:middle;margin-left:6px}
.bar.before{background:#9ecae1}
code{font-size:12px;background:#f0f4f8;padding:1px 4px;border-radius:3px}
header code{background:rgba(255,255,255,.15);color:#fff}
"""


# -- images -----------------------------------------------------------------------------------


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(image: np.ndarray, size: int = THUMB_PX) -> bytes:
    """A (C, H, W) float image in [0, 1] (or an (H, W, 3|4) RGB array) as an upscaled PNG."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    pixels = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels)
    scale = max(1, size // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def perturbation_png(source: np.ndarray, adversarial: np.ndarray) -> bytes:
    """|adversarial - source| (summed over channels), scaled to its max, in a heat colormap."""
    import matplotlib

    diff = np.abs(np.asarray(adversarial) - np.asarray(source)).sum(0)
    diff = diff / max(float(diff.max()), 1e-12)
    rgb = matplotlib.colormaps["magma"](diff)[..., :3]
    return image_png(rgb)


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # never a window, also under a display
    import matplotlib.pyplot as plt

    return plt


def per_class_figure(per_class: dict[str, Any]) -> bytes:
    """Grouped bars: held-out accuracy per class, parent vs release."""
    plt = _pyplot()
    classes = per_class["classes"]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(classes) + 2), 3.0))
    values = {k: [np.nan if v is None else v for v in per_class[k]] for k in ("parent", "release")}
    has_parent = not all(np.isnan(values["parent"]))
    width = 0.4 if has_parent else 0.6
    if has_parent:
        ax.bar(x - width / 2, values["parent"], width, label="parent", color=COLORS["parent"])
        ax.bar(x + width / 2, values["release"], width, label="release", color=COLORS["release"])
    else:
        ax.bar(x, values["release"], width, label="release", color=COLORS["release"])
    finite = [v for vs in values.values() for v in vs if not np.isnan(v)]
    low = min(finite) if finite else 0.0
    ax.set_ylim(max(0.0, low - 5.0), 100.5)
    ax.set_xticks(x, classes, rotation=30 if max(len(c) for c in classes) > 3 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _figure_png(fig)


def distribution_figure(distributions: dict[str, Any]) -> bytes:
    """True-class confidence (top) and loss (bottom) per set, parent (left) vs release."""
    plt = _pyplot()
    scores = distributions["scores"]
    models = [m for m in ("parent", "release") if m in scores]
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 5.4), squeeze=False)
    for col, who in enumerate(models):
        for row, key in enumerate(("confidence", "loss")):
            ax = axes[row][col]
            for name, s in scores[who].items():
                values = np.asarray(s[key], dtype=float)
                if key == "loss":
                    values = np.log10(np.clip(values, 1e-6, None))
                bins = np.linspace(0, 1, 26) if key == "confidence" else np.linspace(-6, 2, 33)
                color = COLORS.get(name, "#333333")
                if name == "forget" and len(values) < 40:  # a few points: a rug, not a density
                    ax.plot(values, np.zeros_like(values), "|", color=color, markersize=18,
                            markeredgewidth=2, label=f"{name} (n={len(values)})")
                else:
                    ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.6,
                            color=color, label=f"{name} (n={len(values)})")
            ax.set_title(f"{who}: true-class {key}", fontsize=10)
            ax.set_xlabel("p(true class)" if key == "confidence" else "log10 cross-entropy")
            ax.set_yticks([])
            ax.legend(fontsize=7, loc="upper left" if key == "loss" else "upper center")
    fig.tight_layout()
    return _figure_png(fig)


# -- HTML -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) \
        else f"{value:.{digits}f}"


def _conf_cell(pred: int | None, conf: float | None, names: list[str], before: bool) -> str:
    if pred is None:
        return "<td>-</td>"
    width = round(60 * (conf or 0.0))
    cls = "bar before" if before else "bar"
    return (f'<td>{_e(names[pred])} <span class="num">({conf:.2f})</span>'
            f'<span class="{cls}" style="width:{width}px"></span></td>')


def _img(png: bytes, alt: str, cls: str = "thumb") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="{png_data_uri(png)}">'


def _badges(summary: dict[str, Any]) -> str:
    out = [f'<span class="badge alias">@{_e(a)}</span>' for a in summary["aliases"]]
    ok = summary["gates_passed"]
    out.append(f'<span class="badge {"pass" if ok else "fail"}">'
               f'{"gates passed" if ok else "gates failed"}</span>')
    return "".join(out)


def _summary_html(r) -> str:
    s, m = r.summary, r.summary["metrics"]
    created = dt.datetime.fromtimestamp(s["created"] / 1000, tz=dt.UTC).strftime(
        "%Y-%m-%d %H:%M UTC") if s.get("created") else "-"
    cards = [("objective met", m.get("objective_rate"), "%"),
             ("forget accuracy", m.get("forget_acc"), "%"),
             ("held-out accuracy", m.get("test_acc"), "%"),
             ("drop vs parent", m.get("test_drop"), " pts"),
             ("earlier deletions held", m.get("earlier_objective_rate"), "%"),
             ("MIA efficacy", m.get("mia_efficacy"), "%"),
             ("loss-attack AUC", m.get("loss_mia_auc"), ""),
             ("unlearning steps", m.get("steps"), "")]
    card_html = "".join(
        f'<div class="card"><div class="v">{_pct(v, 0 if k == "unlearning steps" else 2)}'
        f'{u if v is not None else ""}</div><div class="k">{_e(k)}</div></div>'
        for k, v, u in cards if v is not None)
    batches = ", ".join(s["batches"]) or "none (base model)"
    return (f"<p>{_badges(s)} Version <b>{s['version']}</b> of <code>{_e(s['model'])}</code>, "
            f"created {created} by run <code>{_e(s['run_name'])}</code> "
            f"(<code>{_e(s['run_id'])}</code>).</p>"
            f"<p>Parent: <b>{_e(s['parent_version'] or 'none')}</b>; batch: <b>{_e(batches)}</b>; "
            f"objective: <b>{_e(s['objective'])}</b>; method: <b>{_e(s['method'])}</b>; "
            f"dataset: <b>{_e(s['dataset'])}</b>.</p>"
            f'<div class="cards">{card_html}</div>'
            f'<p class="note">Load it: <code>mlflow.pytorch.load_model("{_e(s["model_uri"])}")'
            f"</code> with <code>MLFLOW_TRACKING_URI={_e(s['tracking_uri'])}</code>.</p>")


def _gates_html(r) -> str:
    if not r.gates:
        return ('<p class="note">No gate report: this version is the base model (pretrain), '
                "which is not gated.</p>")
    rows = "".join(
        f"<tr><td>{_e(c['name'])}</td><td>"
        f'<span class="badge {"pass" if c["passed"] else "fail"}">'
        f'{"pass" if c["passed"] else "FAIL"}</span></td>'
        f'<td class="num">{_pct(c["value"])}</td><td class="num">{_pct(c["limit"])}</td>'
        f"<td>{_e(c['detail'])}</td></tr>" for c in r.gates["checks"])
    verdict = ("all gates passed" if r.gates["passed"]
               else "failed: " + ", ".join(r.gates["failures"]))
    return (f"<p>Verdict: <b>{_e(verdict)}</b> (limits from <code>params.yaml</code> "
            "<code>gates</code>).</p><table><tr><th>gate</th><th>result</th><th>value</th>"
            f"<th>limit</th><th>detail</th></tr>{rows}</table>")


def _forget_html(r) -> str:
    names = r.per_class["classes"]
    if not r.forget:
        return '<p class="note">No forget instances: this version deleted nothing.</p>'
    rows = []
    for f in r.forget:
        goal = (f"relabel to {_e(names[f['new_label']])}" if f["objective"] == "relabel"
                else f"as-if-unseen (label confidence &le; {_pct(f['ceiling_conf'])})"
                if f.get("ceiling_conf") is not None else _e(f["objective"]))
        met = f'<span class="badge {"pass" if f["objective_met"] else "fail"}">' \
              f'{"met" if f["objective_met"] else "not met"}</span>'
        rows.append(
            f"<tr><td>{_img(image_png(f['image']), 'instance ' + str(f['instance_id']))}</td>"
            f'<td class="num">{f["instance_id"]}'
            + (f'<br><span class="note">{_e(f["instance_key"])}</span>'
               if f.get("instance_key") else "")
            + f'</td><td>{_e(f["request_id"])}</td>'
            f"<td>{goal}</td><td>{_e(names[f['label']])}</td>"
            f"{_conf_cell(f['before_pred'], f['before_conf'], names, True)}"
            f"{_conf_cell(f['after_pred'], f['after_conf'], names, False)}"
            f'<td class="num">{_pct(f["before_label_conf"])} &rarr; '
            f'{_pct(f["after_label_conf"])}</td><td>{met}</td></tr>')
    more = (f'<p class="note">Showing {len(r.forget)} of {r.forget_total} instances.</p>'
            if r.forget_total > len(r.forget) else "")
    earlier = ""
    if r.earlier:
        items = "".join(
            f"<tr><td>{_e(b['batch_id'])}</td><td class='num'>{b['objective_met']} / "
            f"{b['instances']}</td></tr>" for b in r.earlier)
        earlier = ("<h3>Earlier deletions (must stay deleted)</h3><table><tr><th>batch</th>"
                   f"<th>objective still met</th></tr>{items}</table>")
    return ("<p class='note'>Predicted class and its confidence under the parent (before) and "
            "this release (after); the last numbers are the confidence in the original "
            "label.</p><table><tr><th>image</th><th>instance</th><th>request</th>"
            "<th>objective</th><th>label</th><th>before</th><th>after</th>"
            f"<th>p(label)</th><th>objective</th></tr>{''.join(rows)}</table>{more}{earlier}")


def _per_class_html(r) -> str:
    pc = r.per_class
    rows = []
    for i, c in enumerate(pc["classes"]):
        before, after = pc["parent"][i], pc["release"][i]
        delta = None if before is None or after is None else after - before
        rows.append(f"<tr><td>{_e(c)}</td><td class='num'>{pc['counts'][i]}</td>"
                    f"<td class='num'>{_pct(before)}</td><td class='num'>{_pct(after)}</td>"
                    f"<td class='num'>{_pct(delta)}</td></tr>")
    return (f"{_img(per_class_figure(pc), 'held-out accuracy per class', 'figure')}"
            "<table><tr><th>class</th><th>held-out n</th><th>parent %</th><th>release %</th>"
            f"<th>change</th></tr>{''.join(rows)}</table>")


def _mia_html(r) -> str:
    d, m = r.distributions, r.summary["metrics"]
    rows = []
    for who, sets in d["summary"].items():
        for name, s in sets.items():
            rows.append(f"<tr><td>{_e(who)}</td><td>{_e(name)}</td><td class='num'>{s['n']}</td>"
                        f"<td class='num'>{s['mean_confidence']:.3f}</td>"
                        f"<td class='num'>{s['mean_loss']:.3f}</td></tr>")
    attack = ""
    if m.get("mia_efficacy") is not None or m.get("loss_mia_auc") is not None:
        attack = (f"<p>MIA efficacy (share of forget instances an SVC on the true-class "
                  f"probability calls non-members): <b>{_pct(m.get('mia_efficacy'))}%</b>; "
                  f"loss-threshold attack AUC, forget vs held-out: "
                  f"<b>{_pct(m.get('loss_mia_auc'), 3)}</b> (0.5 is chance).</p>")
    return ("<p class='note'>A deletion that is visible leaks: after unlearning, the forget "
            "instances should look like data the model never saw (close to held-out), not "
            "like training data (retain sample), and not be singled out either.</p>"
            f"{attack}{_img(distribution_figure(d), 'confidence and loss distributions', 'figure')}"
            "<table><tr><th>model</th><th>set</th><th>n</th><th>mean p(true class)</th>"
            f"<th>mean loss</th></tr>{''.join(rows)}</table>")


def _adversarial_html(r) -> str:
    if not r.adversarial:
        return ('<p class="note">No adversarial examples: this version has no forget '
                "instances or no parent.</p>")
    names = r.per_class["classes"]
    s = r.adversarial_settings
    rows = []
    for a in r.adversarial:
        rows.append(
            f"<tr><td>{_img(image_png(a['source']), 'source ' + str(a['instance_id']))}</td>"
            f"<td>{_img(image_png(a['adversarial']), 'adversarial ' + str(a['instance_id']))}</td>"
            f"<td>{_img(perturbation_png(a['source'], a['adversarial']), 'perturbation')}</td>"
            f"<td class='num'>{a['instance_id']}</td><td>{_e(names[a['label']])}</td>"
            f"<td>{_e(names[a['target']])}</td><td class='num'>{a['l2']:.2f}</td>"
            f"{_conf_cell(a['parent_source_pred'], a['parent_source_conf'], names, True)}"
            f"{_conf_cell(a['parent_adv_pred'], a['parent_adv_conf'], names, True)}"
            f"{_conf_cell(a['release_adv_pred'], a['release_adv_conf'], names, False)}"
            f'<td><span class="badge {"pass" if a["hit"] else "fail"}">'
            f'{"yes" if a["hit"] else "no"}</span></td></tr>')
    hits = sum(a["hit"] for a in r.adversarial)
    return (f"<p class='note'>Targeted L2 PGD from the parent model on the first {s['count']} "
            f"forget instances (radius {s['eps']:.2f} = {s['eps_rms']:g} RMS per pixel, "
            f"{s['steps']} steps, seed {s['seed']}): the kind of example the unlearning method "
            f"keeps its decision boundary with; {hits} of {len(r.adversarial)} reach their "
            "target under the parent. The perturbation is shown scaled to its maximum.</p><table><tr><th>source</th><th>adversarial</th><th>perturbation</th>"
            "<th>instance</th><th>label</th><th>target</th><th>L2</th><th>parent on source</th>"
            f"<th>parent on adversarial</th><th>release on adversarial</th><th>target reached</th>"
            f"</tr>{''.join(rows)}"
            "</table>")


def _lineage_html(r) -> str:
    lin = r.lineage
    tags = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
                   for k, v in lin["tags"].items())
    chain = "".join(
        f"<tr><td class='num'>{c['version']}</td><td>"
        + "".join(f'<span class="badge alias">@{_e(a)}</span>' for a in c["aliases"])
        + f"</td><td>{_e(c['batch_id'])}</td><td>{_e(c['method'])}</td><td>{_e(c['status'])}"
        f"</td><td class='num'>{_pct(c['test_acc'])}</td></tr>" for c in lin["chain"])
    promos = "".join(
        f"<tr><td>{dt.datetime.fromtimestamp(p['at'], tz=dt.UTC).strftime('%Y-%m-%d %H:%M:%S')}"
        f"</td><td>{_e(p['action'])}</td><td class='num'>{_e(p['previous'])} &rarr; "
        f"{p['version']}</td><td>{_e(p['note'])}</td></tr>" for p in lin["promotions"])
    promo_html = ("<h3>Promotions involving this version</h3><table><tr><th>at</th>"
                  f"<th>action</th><th>champion</th><th>note</th></tr>{promos}</table>"
                  if promos else "")
    return ("<table>" + tags + "</table><h3>Ancestry (newest first)</h3><table><tr>"
            "<th>version</th><th>aliases</th><th>batch</th><th>method</th><th>status</th>"
            f"<th>held-out %</th></tr>{chain}</table>{promo_html}")


RENDERERS: dict[str, Callable[[Any], str]] = {
    "summary": _summary_html, "gates": _gates_html, "forget": _forget_html,
    "per-class": _per_class_html, "mia": _mia_html, "adversarial": _adversarial_html,
    "lineage": _lineage_html,
}


def render_html(report, generated: dt.datetime | None = None) -> str:
    """The whole page for a ``tasks.report.ReleaseReport`` (no script, no external URL)."""
    s = report.summary
    when = (generated or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{RENDERERS[sid](report)}</section>'
                   for sid, title in SECTIONS)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in report.notes)
    title = f"{s['model']} version {s['version']}: release report"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><div class='sub'>{_badges(s)} generated {when} by "
            f"<code>unlearn report {s['version']}</code></div><nav>{nav}</nav></header>"
            f"<main>{notes}{body}</main></body></html>\n")


# -- the command's work -----------------------------------------------------------------------


def build_report(paths, cfg, version: int, output: Path | None = None, *, log: bool = True,
                 progress=None) -> dict[str, Any]:
    """Collect, render, write and (``log``) attach the report of ``version`` to its run."""
    from tasks.report import collect_report, log_report

    report = collect_report(paths, cfg, version, progress=progress)
    page = render_html(report)
    out = Path(output) if output else paths.artifacts / "reports" / f"v{version}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    artifact = log_report(paths, cfg, report.summary["run_id"], out) if log else None
    return {"version": version, "model": report.model, "path": str(out.resolve()),
            "bytes": out.stat().st_size, "artifact": artifact,
            "sections": [sid for sid, _ in SECTIONS],
            "gates_passed": report.summary["gates_passed"], "data": report.to_dict()}

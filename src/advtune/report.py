"""Plots (PNG) from results. Figures are drawn on an Agg canvas directly: no global pyplot state,
no display needed, and the caller's matplotlib backend is left alone."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from . import filenames as files
from .errors import AdvtuneError
from .frontier import PLATEAU_TOLERANCE, curves, reference_plateau
from .frontier import findings as frontier_findings
from .utils import atomic_write_bytes, atomic_write_text, read_json


def plot_eps_curve(curves, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Robust accuracy against eps as a PNG.

    curves: an `EpsCurve`, or a mapping label -> `EpsCurve` to compare models (e.g. base vs fine-tuned).
    Dashed lines show the raw per-eps accuracies where they differ from the monotone curve.
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    if not curves:
        raise AdvtuneError("plot_eps_curve needs at least one curve")
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        if not hasattr(c, "eps") or not hasattr(c, "accuracy"):
            raise AdvtuneError(
                f"plot_eps_curve expects EpsCurve objects (from evaluate.eps_curve), got {type(c).__name__}"
            )
        (line,) = ax.plot(c.eps, c.accuracy, marker="o", label=label or None)
        if list(c.raw_accuracy) != list(c.accuracy):
            ax.plot(c.eps, c.raw_accuracy, ls="--", lw=0.8, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _figure(w: float = 5.0, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())  # the one atomic write (utils)
    return path


def plot_concentration(curves: Mapping[str, dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Adversarial errors repaired vs share of components restored: one line per criterion, and the
    random control (mean ± std over seeds) in grey. `curves`: criterion -> ConcentrationCurve.to_json()."""
    if not curves:
        raise AdvtuneError("plot_concentration needs at least one curve")
    fig = _figure(5.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    first = next(iter(curves.values()))
    if not first["n_errors"]:
        ax.text(
            0.5, 0.5, "the attack caused no adversarial errors:\nnothing to repair, no curve", ha="center", va="center"
        )
        ax.set_axis_off()
        return _save(fig, path)
    xs = [100 * s for s in first["shares"]]
    mean = [m if m is not None else float("nan") for m in first["random_mean"]]
    std = [d if d is not None else 0.0 for d in first["random_std"]]
    ax.plot(
        xs,
        [100 * m for m in mean],
        color="grey",
        ls="--",
        marker=".",
        label=f"random ({len(first['random_seeds'])} seeds)",
    )
    ax.fill_between(
        xs,
        [100 * (m - d) for m, d in zip(mean, std)],
        [100 * (m + d) for m, d in zip(mean, std)],
        color="grey",
        alpha=0.2,
    )
    for (name, c), marker in zip(curves.items(), "osD^v*"):
        ax.plot(
            [100 * s for s in c["shares"]],
            [100 * (r if r is not None else float("nan")) for r in c["repaired"]],
            marker=marker,
            markersize=5,
            alpha=0.85,
            label=f"top-p by {name}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("components restored to clean activation (% of all, log scale)")
    ax.set_ylabel("adversarial errors repaired (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(
        title or f"Concentration of adversarial errors ({first['n_errors']} errors, {first['n_samples']} examples)",
        fontsize=9,
    )
    return _save(fig, path)


def plot_layer_scores(layers: Mapping[str, Mapping[str, dict]], path: str | os.PathLike) -> Path:
    """Per-layer vulnerability bars: for each criterion, each layer's share of the total score."""
    if not layers:
        raise AdvtuneError("plot_layer_scores needs at least one criterion")

    names = list(next(iter(layers.values())).keys())
    fig = _figure(max(5.0, 0.9 * len(names) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(layers)
    for i, (crit, rows) in enumerate(layers.items()):
        sums = np.array([max(rows[n]["sum"], 0.0) if n in rows else 0.0 for n in names])
        total = sums.sum() or 1.0
        ax.bar(np.arange(len(names)) + i * width - 0.4 + width / 2, 100 * sums / total, width, label=crit)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of total score (%)")
    ax.set_title("Vulnerability by layer", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ---------------------------------------------------------------- experiment report


def plot_pareto(rows: list[dict], path: str | os.PathLike) -> Path:
    """Robust accuracy against training cost (gradient evaluations, log scale): the Pareto view.
    Selective variants include the analysis cost (the scoring attack) in their x position."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"standard": "grey", "train": "tab:red", "finetune": "tab:blue"}
    for r in rows:
        x = max(1, r["grad_evals"] + r.get("analysis_grad_evals", 0))
        c = colors.get(r["kind"], "k")
        if r["kind"] == "finetune" and r.get("select") == "random":
            c = "tab:orange"
        elif r["kind"] == "finetune" and r.get("select") == "all":
            c = "tab:purple"
        ax.scatter([x], [100 * r["robust_acc"]], color=c, marker="x" if r.get("suspect") else "o", s=40, zorder=3)
        ax.annotate(r["variant"], (x, 100 * r["robust_acc"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training cost: gradient evaluations (log; selective incl. analysis)")
    ax.set_ylabel("robust accuracy, worst case (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Robustness vs compute (x marks a suspect evaluation)", fontsize=9)
    return _save(fig, path)


def plot_frontier(points: list[dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Worst-case robust accuracy against total gradient evaluations, one curve per variant (from its
    snapshots), with the reference's plateau as a dashed line. The x axis counts every curve the same
    way: fine-tuning curves include the base model's training and the analysis behind a selection."""
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    by = curves(points)
    cmap = matplotlib_colors(len(by))
    for (name, pts), color in zip(by.items(), cmap):
        xs = [max(1, p["total_grad_evals"]) for p in pts]
        ys = [100 * p["robust_acc"] for p in pts]
        style = "-" if len(pts) > 1 else ""
        ref = pts[0].get("reference")
        ax.plot(xs, ys, style, marker="s" if ref else "o", ms=4, lw=2.2 if ref else 1.4, color=color, label=name)
        for x, y, p in zip(xs, ys, pts):
            if p.get("suspect"):
                ax.scatter([x], [y], marker="x", color="red", s=50, zorder=4)
    try:
        plat = reference_plateau(points)
        ax.axhline(100 * plat.robust_acc, ls="--", color="grey", lw=1)
        ax.axhline(100 * (plat.robust_acc - 0.02), ls=":", color="grey", lw=1)
        ax.axvline(plat.cost, ls=":", color="grey", lw=1)
        ax.axvline(0.25 * plat.cost, ls=":", color="tab:green", lw=1)
        ax.annotate(
            f"{plat.variant} plateau {100 * plat.robust_acc:.1f}% (reached within {100 * PLATEAU_TOLERANCE:g} pt at "
            f"{plat.cost:,}); dotted: plateau - 2 pt",
            (plat.cost, 100 * plat.robust_acc),
            fontsize=7,
            ha="right",
            xytext=(-4, 4),
            textcoords="offset points",
        )
        ax.annotate(
            "25% of that cost",
            (0.25 * plat.cost, 2),
            fontsize=7,
            color="tab:green",
            ha="right",
            xytext=(-3, 0),
            textcoords="offset points",
        )
    except AdvtuneError:
        pass
    ax.set_xscale("log")
    ax.set_xlabel("gradient evaluations (log): training + base model + analysis")
    ax.set_ylabel("worst-case robust accuracy (%)")
    # room above the best point for the plateau's label; a low-robustness setting (CIFAR-10) is not squashed
    top = max([100 * p["robust_acc"] for p in points] + [10.0])
    ax.set_ylim(-2, min(102, top * 1.25 + 5))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.set_title(title or "Robustness per compute (x: suspect evaluation)", fontsize=9)
    return _save(fig, path)


def matplotlib_colors(n: int) -> list:
    """n distinct colours, stable per position (one colour per variant across figures)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_eps_sweep(rows: list[dict], path: str | os.PathLike) -> Path | None:
    """Robust accuracy vs eps for each variant family, when the experiment sweeps eps."""
    fams: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        fams.setdefault(_family(r), []).append((r["eps"], r["robust_acc"]))
    if not any(len({e for e, _ in pts}) > 1 for pts in fams.values()):
        return None
    fig = _figure(5.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for fam, pts in fams.items():
        pts.sort()
        ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", label=fam)
    ax.set_xlabel("eps (training and evaluation)")
    ax.set_ylabel("robust accuracy, worst case (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _family(r: dict) -> str:
    """A variant's name without its eps suffix (eps sweeps are drawn as one line per family)."""
    return re.sub(r"-eps[0-9.e-]+", "", r["variant"])


def _fmt_int(v) -> str:
    return f"{int(v):,}" if v is not None else "–"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    attack_cols = []
    for r in rows:
        attack_cols += [k for k in r if k.startswith("acc[") and k not in attack_cols]
    head = [
        "variant",
        "eps",
        "clean",
        *[c[4:-1] for c in attack_cols],
        "worst case",
        "grad evals (train)",
        "+ analysis",
        "wall s",
        "FLOPs",
        "trainable params",
        "gate",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["variant"],
                f"{r['eps']:.4g}",
                f"{100 * r['clean_acc']:.2f}%",
                *[f"{100 * r[c]:.2f}%" if c in r else "–" for c in attack_cols],
                f"{100 * r['robust_acc']:.2f}%",
                _fmt_int(r["grad_evals"]),
                _fmt_int(r.get("analysis_grad_evals")) if r.get("analysis_grad_evals") else "–",
                f"{r['wall_s'] + r.get('analysis_wall_s', 0):.0f}",
                f"{r['flops']:.3g}",
                _fmt_int(r.get("trainable_params")),
                "SUSPECT" if r.get("suspect") else "passed",
            ]
        )
    return head, body


def headline(rows: list[dict], frontier: bool = False) -> list[str]:
    """Plain-language findings, computed from the rows (no claim is written that the numbers don't make).
    frontier=True: the frontier's findings already compare with adversarial training (counting costs
    alike on every curve), so the final-model comparison with it is left out."""
    out = []
    by_eps: dict[float, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r)
    for eps, rs in sorted(by_eps.items()):
        full = [r for r in rs if r["kind"] == "train" and r.get("attack") and not r.get("suspect")]
        sel = [r for r in rs if r["kind"] == "finetune" and r.get("select") == "top" and not r.get("suspect")]
        rnd = [r for r in rs if r["kind"] == "finetune" and r.get("select") == "random" and not r.get("suspect")]
        for r in rs:
            if r.get("suspect"):
                out.append(
                    f"eps={eps:g}: **{r['variant']}** tripped the gradient-masking gate ({r['suspect']}); "
                    "its robust accuracy is not trustworthy and it is not called robust here."
                )
        if full and sel and not frontier:
            ref = max(full, key=lambda r: r["robust_acc"])
            best = max((r for r in sel if not r.get("suspect")), key=lambda r: r["robust_acc"], default=None)
            if best is not None:
                cost = best["grad_evals"] + best.get("analysis_grad_evals", 0)
                ratio = cost / max(ref["grad_evals"], 1)
                diff = 100 * (best["robust_acc"] - ref["robust_acc"])
                verdict = "within 1 point of" if diff >= -1 else f"{-diff:.1f} points below"
                if diff > 1:
                    verdict = f"{diff:.1f} points above"
                out.append(
                    f"eps={eps:g}: the best selective fine-tuning (**{best['variant']}**) reached "
                    f"{100 * best['robust_acc']:.2f}% worst-case robust accuracy, {verdict} full adversarial training "
                    f"(**{ref['variant']}**, {100 * ref['robust_acc']:.2f}%), with {100 * ratio:.1f}% of its gradient "
                    f"evaluations (analysis included; the standard model's own training not counted)."
                )
        if sel and rnd:
            for r in rnd:
                if r.get("params_like"):  # the control of one named selection: compare with that one
                    same = [s for s in sel if s["variant"] == r["params_like"]]
                    what, ctrl = (
                        f"with ~{r.get('trainable_params') or 0:,} trainable parameters",
                        "random units with as many parameters",
                    )
                elif r.get("share") is not None:  # the same share of components, same attack and budget
                    same = [
                        s
                        for s in sel
                        if s.get("share") == r["share"]
                        and s.get("attack") == r.get("attack")
                        and s.get("grad_evals") == r.get("grad_evals")
                    ]
                    what, ctrl = f"at share {r['share']:g}", "the same share chosen at random"
                else:  # the same trainable parameters (within 10%), attack and budget
                    n = r.get("trainable_params") or 0
                    same = [
                        s
                        for s in sel
                        if s.get("attack") == r.get("attack")
                        and s.get("trainable_params")
                        and abs(s["trainable_params"] - n) <= 0.1 * s["trainable_params"]
                        and s.get("grad_evals") == r.get("grad_evals")
                    ]
                    what, ctrl = f"with ~{n:,} trainable parameters", "random units with as many parameters"
                if same:
                    s = max(same, key=lambda q: q["robust_acc"])
                    out.append(
                        f"eps={eps:g}: {what}, selected components ({s['variant']}) gave {100 * s['robust_acc']:.2f}% "
                        f"vs {100 * r['robust_acc']:.2f}% for {ctrl} "
                        f"({100 * (s['robust_acc'] - r['robust_acc']):+.1f} points)."
                    )
    return out


def write_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained: plots embedded) and report.md (+ PNGs) from an experiment folder's
    records; a partial or corrupt record is a one-line error naming the folder."""
    return _guarded(_write_report, folder, "advtune experiment CONFIG --out")


def _guarded(fn, folder, how: str) -> dict[str, Path]:
    try:
        return fn(folder)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise AdvtuneError(
            f"{folder}: its records are incomplete or corrupt ({type(e).__name__}: {e}); "
            f"re-run `{how} {folder}` to complete them"
        ) from None


def _write_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained: plots embedded) and report.md (+ PNGs) from an experiment folder's
    records. Every number comes from results.json and the analysis files; nothing is recomputed."""
    folder = Path(folder)
    res = folder / files.RESULTS
    if not res.is_file():
        raise AdvtuneError(f"{folder} has no results.json; run `advtune experiment CONFIG --out {folder}` first")

    rows = read_json(res, "results")["rows"]
    if not rows:
        raise AdvtuneError(f"{folder}/results.json holds no finished variant yet; run the experiment first")
    exp = read_json(folder / files.EXPERIMENT, "experiment record") if (folder / files.EXPERIMENT).is_file() else {}
    cfg = exp.get("config", {})
    figs: list[tuple[str, Path]] = []
    frontier_notes: list[str] = []
    if (folder / files.FRONTIER).is_file():
        points = read_json(folder / files.FRONTIER, "frontier")["points"]
        figs.append(
            (
                "Robustness per compute: the frontier",
                plot_frontier(points, folder / "frontier.png", title=cfg.get("name")),
            )
        )
        frontier_notes = frontier_findings(points)
    figs.append(("Robustness vs compute (final models)", plot_pareto(rows, folder / "pareto.png")))
    eps_png = plot_eps_sweep(rows, folder / "eps-sweep.png")
    if eps_png:
        figs.append(("Robust accuracy vs eps", eps_png))
    analysis_notes = []
    for a in sorted(folder.glob("analysis*")):
        if (a / files.CONCENTRATION).is_file():
            curves = json.loads((a / files.CONCENTRATION).read_text())
            figs.append(
                (
                    f"Concentration of adversarial errors ({a.name})",
                    plot_concentration(curves, folder / f"{a.name}-concentration.png"),
                )
            )
            for name, c in curves.items():
                pts = {round(s, 4): (r, m) for s, r, m in zip(c["shares"], c["repaired"], c["random_mean"])}
                for share in (0.01, 0.05, 0.1):
                    if share in pts and pts[share][0] is not None:
                        analysis_notes.append(
                            f"{a.name}: restoring the top {100 * share:g}% of components by {name} repairs "
                            f"{100 * pts[share][0]:.1f}% of {c['n_errors']} adversarial errors "
                            f"(random {100 * (pts[share][1] or 0):.1f}%)."
                        )
        layer_files = sorted(a.glob("layers-*.json"))
        if layer_files:
            layers = {p.stem[len("layers-") :]: json.loads(p.read_text()) for p in layer_files}
            figs.append(
                (f"Vulnerability by layer ({a.name})", plot_layer_scores(layers, folder / f"{a.name}-layers.png"))
            )
        summ = a / files.SUMMARY
        if summ.is_file():
            agree = json.loads(summ.read_text()).get("rank_agreement_with_restoration", {})
            for k, v in agree.items():
                analysis_notes.append(
                    f"{a.name}: rank agreement (Spearman) of {k} with the restoration ground truth: {v:.3f}."
                )
    head, body = _table(rows)
    findings = frontier_notes + headline(rows, frontier=bool(frontier_notes))
    ev = cfg.get("evaluation", {})
    protocol = (
        f"Threat model {cfg.get('threat', {}).get('norm', 'linf')}, eps {cfg.get('threat', {}).get('eps')}. "
        f"Evaluation: {ev.get('suite') or ev.get('attacks')} on the first {rows[0].get('eval_examples')} test images; "
        "worst case per example over the attacks; the gradient-masking gate ran on every model."
    )
    base = cfg.get("base", {})
    setup = (
        f"Base: {base.get('pretrained') or (str(base.get('model')) + ' on ' + str(base.get('dataset')))}"
        + (f", training subset {base['limit']}" if base.get("limit") else "")
        + "."
    )
    notes = cfg.get("notes")
    title = f"advtune report: {cfg.get('name', folder.name)}"

    md = [f"# {title}", "", setup, "", protocol, ""]
    if notes:
        md += [f"> {notes}", ""]
    if findings:
        md += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    md += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    md += [
        "",
        "Costs: gradient evaluations = forward+backward passes of one example during training (attack steps "
        "plus the update). Selective and full fine-tuning start from the standard model; this table shows their own "
        "training only, '+ analysis' the scoring attack behind a selection. The frontier (figure and findings) counts "
        "every curve alike: fine-tuning curves there include the base model's training and the analysis.",
        "",
    ]
    if analysis_notes:
        md += ["## Vulnerability analysis", ""] + [f"- {n}" for n in analysis_notes] + [""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]

    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")

    def img(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(
        "<tr"
        + (' class="suspect"' if r[-1] == "SUSPECT" else "")
        + ">"
        + "".join(f"<td>{esc(c)}</td>" for c in r)
        + "</tr>"
        for r in body
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}tr.suspect{background:#fde2e2}"
        "figure{display:inline-block;margin:1em}figcaption{font-size:13px;color:#555}.note{color:#555;font-size:13px}"
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{esc(setup)}</p><p>{esc(protocol)}</p>",
    ]
    if notes:
        parts.append(f"<p class='note'>{esc(str(notes))}</p>")
    if findings:
        parts.append(
            "<h2>Findings</h2><ul>" + "".join(f"<li>{esc(f).replace('**', '')}</li>" for f in findings) + "</ul>"
        )
    parts.append(f"<h2>Results</h2><table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>")
    parts.append(
        "<p class='note'>Gradient evaluations: forward+backward passes of one example during training. "
        "Fine-tuning variants start from the standard model (its training not included); '+ analysis' is the "
        "scoring attack behind a selection. A red row tripped the gradient-masking gate and is not called robust.</p>"
    )
    if analysis_notes:
        parts.append(
            "<h2>Vulnerability analysis</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in analysis_notes) + "</ul>"
        )
    parts.append(
        "<h2>Figures</h2>"
        + "".join(
            f"<figure><img src='{img(p)}' alt='{esc(c)}'><figcaption>{esc(c)}</figcaption></figure>" for c, p in figs
        )
    )
    parts.append("</body></html>")
    atomic_write_text(folder / files.REPORT_HTML, "".join(parts))
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}


# ---------------------------------------------------------------- harden report


def write_harden_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained) and report.md of an `advtune harden` folder, from its records:
    before/after robustness, what was trained and where it sits, what every stage cost."""
    return _guarded(_write_harden_report, folder, "advtune harden BASE --resume --out")


def _write_harden_report(folder: str | os.PathLike) -> dict[str, Path]:
    folder = Path(folder)
    if not (folder / files.SUMMARY).is_file():
        raise AdvtuneError(f"{folder} has no summary.json; run `advtune harden ... --out {folder}` first")
    s = read_json(folder / files.SUMMARY, "harden summary")
    c = s["cost"]
    sel = s.get("selection") or {}
    figs: list[tuple[str, Path]] = []
    conc = folder / files.ANALYSIS / files.CONCENTRATION
    if conc.is_file():
        figs.append(
            (
                "Concentration of adversarial errors (the vulnerability map)",
                plot_concentration(json.loads(conc.read_text()), folder / "concentration.png"),
            )
        )
    if sel.get("by_layer"):
        figs.append(("Where the trained parameters sit", plot_selection(sel, folder / "selection.png")))
    share = 100 * (s.get("param_share") or 0)
    headline_ = (
        f"Selective adversarial fine-tuning of {sel.get('trainable_params', 0):,} parameters ({share:.2f}% of the "
        "model) "
        f"took worst-case robust accuracy at {s['norm']} eps={s['eps']:g} from {100 * s['before']['robust_acc']:.2f}% "
        f"to {100 * s['after']['robust_acc']:.2f}% (clean {100 * s['before']['clean_acc']:.2f}% -> "
        f"{100 * s['after']['clean_acc']:.2f}%), for {c['harden_grad_evals']:,} gradient evaluations "
        f"(analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,}); the base model's own "
        f"training took {c['base_training_grad_evals'] or 0:,}."
    )
    rows = [
        ("", "clean", "worst-case robust", "gate"),
        (
            "before (base model)",
            f"{100 * s['before']['clean_acc']:.2f}%",
            f"{100 * s['before']['robust_acc']:.2f}%",
            "SUSPECT" if s["before"].get("suspect") else "passed",
        ),
        (
            "after (hardened)",
            f"{100 * s['after']['clean_acc']:.2f}%",
            f"{100 * s['after']['robust_acc']:.2f}%",
            "SUSPECT" if s["after"].get("suspect") else "passed",
        ),
    ]
    recipe = s.get("recipe", {})
    recipe_line = (
        f"Recipe: whole {recipe.get('granularity')}s ranked by {recipe.get('criterion')} "
        f"(analysis: {recipe.get('analysis_attack')} on {recipe.get('analysis_limit')} training images) within "
        f"{recipe.get('params')} of the parameters; fine-tuning with {recipe.get('attack')}, eps ramped over "
        f"{100 * float(recipe.get('eps_warmup', 0)):g}% of the budget, {recipe.get('optimizer')} lr "
        f"{recipe.get('lr')}, "
        f"{recipe.get('schedule')} schedule, batch {recipe.get('batch_size')}; budget {s['budget']:,} gradient "
        "evaluations."
    )
    protocol = (
        f"Evaluation: worst case per example of {s['evaluation']} on the first {s['test_examples']} test images "
        "(the same images before and after), gradient-masking gate on."
    )
    layer_lines = [
        f"{n}: {u}/{t} units, {sel.get('params_by_layer', {}).get(n, 0):,} parameters"
        for n, (u, t) in sel.get("by_layer", {}).items()
        if u
    ]
    md = [
        f"# advtune harden: {s['architecture']} at {s['norm']} eps={s['eps']:g}",
        "",
        headline_,
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", recipe_line, "", protocol, "", "## Trained components", ""] + [f"- {x}" for x in layer_lines] + [""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")
    esc = html.escape

    def img(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    table = (
        "<table>"
        + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{esc(x)}</{'th' if i == 0 else 'td'}>" for x in r) + "</tr>"
            for i, r in enumerate(rows)
        )
        + "</table>"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>advtune harden</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 10px}"
        "figure{display:inline-block;margin:1em}figcaption{font-size:13px;color:#555}.note{color:#555;font-size:13px}"
        "</style></head><body>",
        f"<h1>advtune harden: {esc(str(s['architecture']))} at {esc(s['norm'])} eps={s['eps']:g}</h1>",
        f"<p><b>{esc(headline_)}</b></p>",
        table,
        f"<p class='note'>{esc(recipe_line)}</p><p class='note'>{esc(protocol)}</p>",
        "<h2>Trained components</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in layer_lines) + "</ul>",
        "".join(
            f"<figure><img src='{img(p)}' alt='{esc(cap)}'><figcaption>{esc(cap)}</figcaption></figure>"
            for cap, p in figs
        ),
        "</body></html>",
    ]
    atomic_write_text(folder / files.REPORT_HTML, "".join(parts))
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}


def plot_selection(sel: dict, path: str | os.PathLike) -> Path:
    """Per layer: the share of its units that the selection trains, and its trained parameters."""
    names = list(sel["by_layer"])
    units = [sel["by_layer"][n][0] / max(sel["by_layer"][n][1], 1) for n in names]
    params = [sel.get("params_by_layer", {}).get(n, 0) for n in names]
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), [100 * u for u in units], color="tab:blue")
    for b, n in zip(bars, params):
        if n:
            ax.annotate(
                f"{n:,}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("units trained (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Selected units per layer (labels: trained parameters)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def write_run_report(folder: str | os.PathLike, info_text: str, metrics: list[dict]) -> dict[str, Path]:
    """report.html (self-contained) and report.md of one run folder (train, finetune, analyze): what
    it recorded (`info_text`, from the run's records), its training curve, and every plot it holds."""
    folder = Path(folder)
    figs: list[tuple[str, Path]] = []
    if metrics:
        figs.append(("Training: loss and accuracy per epoch", plot_training(metrics, folder / "training.png")))
    for p in sorted(folder.glob("*.png")):
        if p.name != "training.png":
            figs.append((p.stem.replace("-", " "), p))
    md = [f"# advtune run: {folder.name}", "", "```", info_text, "```", ""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>advtune run</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "pre{background:#f6f6f6;padding:1em;font-size:13px;overflow-x:auto}"
        "figure{display:inline-block;margin:1em}figcaption{font-size:13px;color:#555}</style></head><body>",
        f"<h1>advtune run: {esc(folder.name)}</h1><pre>{esc(info_text)}</pre>",
        "".join(
            f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' alt='{esc(c)}'>"
            f"<figcaption>{esc(c)}</figcaption></figure>"
            for c, p in figs
        ),
        "</body></html>",
    ]
    atomic_write_text(folder / files.REPORT_HTML, "".join(parts))
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}


def plot_training(metrics: list[dict], path: str | os.PathLike) -> Path:
    """Training loss and accuracy (and validation accuracy, when recorded) per epoch."""
    fig = _figure(5.5, 3.4)
    ax = fig.add_subplot(111)
    epochs = [m.get("epoch") for m in metrics]
    ax.plot(epochs, [m.get("train_loss") for m in metrics], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    acc = ax.twinx()
    for key, style in (("train_acc", "-"), ("val_acc", "--"), ("val_robust_acc", ":")):
        ys = [m.get(key) for m in metrics]
        if any(y is not None for y in ys):
            acc.plot(epochs, ys, linestyle=style, color="tab:orange", label=key.replace("_", " "))
    acc.set_ylabel("accuracy")
    acc.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=4, fontsize=8)
    return _save(fig, path)

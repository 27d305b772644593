"""The three reports, each written from a folder's records: an experiment (`write_report`), an
`advtune harden` run (`write_harden_report`) and one run (`write_run_report`). Each writes report.md
(+ its PNGs) and report.html (self-contained: figures embedded). Under torchrun rank 0 writes (it reads
back the figures it wrote) and every rank gets the report's paths. Every record file is checked as it
is read, a typed record by its class (advtune.records: `HardenSummary`, `AnalyzeSummary`, `Frontier`),
any other by the fields the report reads from it (`records`): a missing or malformed field is a
one-line error naming the file, the field and the command that completes the records."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Mapping

from .. import filenames as files
from ..distributed import on_main
from ..errors import AdvtuneError
from ..frontier import Frontier
from ..records import AnalyzeSummary, HardenSummary, problem
from . import records
from .analysis_notes import agreement_notes, concentration_notes
from .comparable import frontier_notes
from .costs import cost_basis
from .experiment_plots import plot_eps_sweep, plot_frontier, plot_pareto, plot_trained_units, variant_colors
from .narrative import (
    counted,
    experiment_protocol,
    experiment_setup,
    harden_comparisons,
    harden_layers,
    harden_lead,
    harden_protocol,
    harden_recipe,
    harden_title,
    headline,
    lead,
)
from .page import (
    bold,
    figures_html,
    markdown_figures,
    markdown_table,
    plain_table_html,
    report_paths,
    results_table_html,
    write_pages,
)
from .plots import plot_concentration, plot_selection, plot_training, plot_unit_scores
from .tables import harden_table, results_table

Figures = list[tuple[str, Path]]  # (caption, PNG)

# ---------------------------------------------------------------- experiment report


def write_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained: plots embedded) and report.md (+ PNGs) from an experiment folder's
    records; a missing or malformed record field is a one-line error naming the file and the field."""
    folder = Path(folder)
    on_main(lambda: _write_report(folder))
    return report_paths(folder)


def _write_report(folder: Path) -> None:
    """Every number comes from results.json and the analysis files; nothing is recomputed."""
    rerun = f"advtune experiment CONFIG --out {folder} (advtune demo for a demo's folder)"
    res = folder / files.RESULTS
    if not res.is_file():
        raise AdvtuneError(f"{folder} has no results.json; run `{rerun}` first")
    rows = records.read_results(res, rerun=rerun)
    unfinished = records.read_unfinished(res, rerun=rerun)
    if not rows:
        raise AdvtuneError(f"{folder}/results.json holds no finished variant yet; run the experiment first")
    exp_file = folder / files.EXPERIMENT
    exp = (
        records.read_record(exp_file, "experiment record", records.EXPERIMENT, rerun=rerun)
        if exp_file.is_file()
        else {}
    )
    cfg = exp.get("config", {})
    colors = variant_colors([r["variant"] for r in rows])
    figs: Figures = []
    notes_of_frontier: list[str] = []
    if (folder / files.FRONTIER).is_file():
        points = Frontier.read(folder / files.FRONTIER, rerun=rerun).points
        by_eps: dict[float | None, list] = {}
        for p in points:  # one figure per eps: a curve is drawn against the reference's plateau at its own eps
            by_eps.setdefault(p.eps, []).append(p)
        for eps, pts in sorted(by_eps.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            at = f" at eps={eps:g}" if len(by_eps) > 1 and eps is not None else ""
            name = f"frontier-eps{eps:g}.png" if at else "frontier.png"
            title = f"{cfg.get('name') or ''}{at}".strip() or None
            figs.append(
                (
                    f"Robustness per compute: each variant's checkpoints (the frontier){at}",
                    plot_frontier([p.to_json() for p in pts], folder / name, title=title, colors=colors),
                )
            )
        notes_of_frontier = frontier_notes(points, rows)
    figs.append(("Final models: robustness vs total compute", plot_pareto(rows, folder / "pareto.png", colors)))
    units_png = plot_trained_units(rows, folder / "trained-units.png", colors)
    if units_png:
        figs.append(("Where the trained units sit, per layer", units_png))
    eps_png = plot_eps_sweep(rows, folder / "eps-sweep.png", colors)
    if eps_png:
        figs.append(("Robust accuracy vs eps", eps_png))
    analysis_notes: list[str] = []
    for a in sorted(folder.glob("analysis*")):
        a_figs, a_notes = _analysis(folder, a, rows, colors, rerun)
        figs += a_figs
        analysis_notes += a_notes

    head, body = results_table(rows)
    first_lines = lead(rows)
    findings = notes_of_frontier + [f for f in headline(rows) if f not in first_lines]
    protocol = experiment_protocol(cfg, rows)
    if unfinished:  # left out with --only, or interrupted: the comparisons above leave it out, so say which
        first_lines.append(
            f"Not finished: {', '.join(unfinished)} (no evaluation record yet); every comparison here leaves "
            f"{'it' if len(unfinished) == 1 else 'them'} out. Run them with `advtune experiment CONFIG --out "
            f"{folder}` (`advtune demo` for a demo's folder)."
        )
    setup = experiment_setup(cfg)
    notes = cfg.get("notes")
    title = f"advtune report: {cfg.get('name', folder.name)}"

    md = [f"# {title}", ""]
    for line in first_lines:  # the lead: what won and at what cost, before anything else
        md += [line, ""]
    basis = cost_basis(rows)
    md += [setup, "", protocol, "", basis, ""]
    if notes:
        md += [f"> {notes}", ""]
    if findings:
        md += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    md += ["## Results", ""] + markdown_table(head, body) + [""]
    if analysis_notes:
        md += ["## Vulnerability analysis", ""] + [f"- {n}" for n in analysis_notes] + [""]
    md += markdown_figures(figs)

    esc = html.escape
    blocks = [
        f"<h1>{esc(title)}</h1>",
        "<div class='lead'>" + "".join(f"<p>{bold(esc(line))}</p>" for line in first_lines) + "</div>",
        f"<p>{esc(setup)} {esc(protocol)}</p><p class='note'>{esc(basis)}</p>",
    ]
    if notes:
        blocks.append(f"<p class='note'>{esc(str(notes))}</p>")
    if findings:
        blocks.append("<h2>Findings</h2><ul>" + "".join(f"<li>{bold(esc(f))}</li>" for f in findings) + "</ul>")
    blocks.append(
        f"<h2>Results</h2><div class='scroll'>{results_table_html(head, body)}</div>"
        "<p class='note'>A red row tripped the gradient-masking gate and is not called robust. Own grad evals: the "
        "variant's own training; total: with the base model's training and the analysis, as everywhere else.</p>"
    )
    if analysis_notes:
        blocks.append(
            "<h2>Vulnerability analysis</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in analysis_notes) + "</ul>"
        )
    blocks.append("<h2>Figures</h2>" + figures_html(figs))
    write_pages(folder, md, title, blocks)


def _analysis(
    folder: Path, a: Path, rows: list[dict], colors: Mapping[str, tuple], rerun: str
) -> tuple[Figures, list[str]]:
    """One analysis folder of an experiment: its figures and its notes."""
    figs: Figures = []
    notes: list[str] = []
    a_eps = None
    if (a / files.CONFIG).is_file():
        a_cfg = records.read_record(a / files.CONFIG, "analysis config", records.ANALYSIS_CONFIG, rerun=rerun)
        a_eps = a_cfg.get("run", {}).get("eps")
    scores = records.read_scores(a, rerun=rerun)
    if scores:
        selections = _selections(folder, rows, a_eps, colors, rerun)
        rings = ", and the units each variant trains" if selections else ""  # entry and adapter rules: not units
        figs.append(
            (
                f"Per-unit vulnerability scores by layer{rings} ({a.name})",
                plot_unit_scores(scores, folder / f"{a.name}-unit-scores.png", selections),
            )
        )
    if (a / files.CONCENTRATION).is_file():
        curves_ = records.read_curves(a / files.CONCENTRATION, rerun=rerun)
        figs.append(
            (
                f"Concentration of adversarial errors ({a.name})",
                plot_concentration(curves_, folder / f"{a.name}-concentration.png"),
            )
        )
        notes += concentration_notes(a.name, curves_)
    summ = a / files.SUMMARY
    if summ.is_file():
        agree = AnalyzeSummary.read(summ, rerun=rerun).rank_agreement_with_restoration
        notes += agreement_notes(a.name, agree or {})
    return figs, notes


def _selections(
    folder: Path, rows: list[dict], eps: float | None, colors: Mapping[str, tuple], rerun: str
) -> dict[str, tuple[list[str], tuple]]:
    """{variant: (its selected components, its colour)} for the fine-tuning variants at `eps` that chose
    components (a selection or a random control), from their selection.json."""
    out = {}
    for r in rows:
        if r["kind"] != "finetune" or r.get("select") == "all" or (eps is not None and r["eps"] != eps):
            continue
        p = folder / r["variant"] / files.SELECTION
        if not p.is_file():
            continue
        chosen = records.trained_units(records.read_record(p, "selection", records.SELECTION, rerun=rerun))
        if chosen:  # an entry or adapter rule rings only the layers it trains whole
            out[r["variant"]] = (chosen, colors.get(r["variant"], "k"))
    return out


# ---------------------------------------------------------------- harden report


def write_harden_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained) and report.md of an `advtune harden` folder, from its records:
    before/after robustness, what was trained and where it sits, what every stage cost."""
    folder = Path(folder)
    on_main(lambda: _write_harden_report(folder))
    return report_paths(folder)


def _write_harden_report(folder: Path) -> None:
    rerun = f"advtune harden BASE --resume --out {folder}"
    if not (folder / files.SUMMARY).is_file():
        raise AdvtuneError(f"{folder} has no summary.json; run `advtune harden ... --out {folder}` first")
    summary = HardenSummary.read(folder / files.SUMMARY, rerun=rerun)
    for when in ("before", "after"):  # the report compares the two evaluations
        if getattr(summary, when) is None:
            raise problem(folder / files.SUMMARY, f"field '{when}' is null, not an object", rerun)
    s = summary.to_json()
    sel = s.get("selection") or {}
    figs: Figures = []
    conc = folder / files.ANALYSIS / files.CONCENTRATION
    if conc.is_file():
        figs.append(
            (
                "Concentration of adversarial errors (the vulnerability map)",
                plot_concentration(records.read_curves(conc, rerun=rerun), folder / "concentration.png"),
            )
        )
    scores = records.read_scores(folder / files.ANALYSIS, rerun=rerun)
    if scores and (folder / files.SELECTION).is_file():
        record = records.read_record(folder / files.SELECTION, "selection", records.SELECTION, rerun=rerun)
        chosen = records.trained_units(record)
        caption = "Every unit's vulnerability score by layer; rings: the units this run trained"
        if record.get("kind"):
            caption = (
                f"Every unit's vulnerability score by layer (this run trained {counted(sel)} spread over the layers, "
                "not whole units: where they sit is in the next figure"
                + ("; rings: the layers it trained whole)" if chosen else ")")
            )
        selections = {"hardened": (chosen, "tab:orange")} if chosen else None
        figs.append((caption, plot_unit_scores(scores, folder / "unit-scores.png", selections)))
    if sel.get("by_layer"):
        figs.append(("Where the trained parameters sit", plot_selection(sel, folder / "selection.png", counted(sel))))
    headline_ = harden_lead(s)
    head, body = harden_table(s)
    recipe_line = harden_recipe(s)
    protocol = harden_protocol(s)
    layer_lines = harden_layers(s)
    title = harden_title(s)
    md = [f"# {title}", "", headline_, ""] + markdown_table(head, body)
    comparisons = harden_comparisons(s)  # the checkpoint kept, adversarial training, full fine-tuning
    md += (
        ["", recipe_line, "", protocol, ""]
        + [f"- {x}" for x in comparisons]
        + ["", "## Trained components", ""]
        + [f"- {x}" for x in layer_lines]
        + [""]
    )
    md += markdown_figures(figs)
    esc = html.escape
    blocks = [
        f"<h1>{esc(title)}</h1>",
        f"<div class='lead'><p>{esc(headline_)}</p></div>",
        plain_table_html(head, body),
        f"<p class='note'>{esc(recipe_line)}</p><p class='note'>{esc(protocol)}</p>",
        "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in comparisons) + "</ul>" if comparisons else "",
        "<h2>Trained components</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in layer_lines) + "</ul>",
        figures_html(figs),
    ]
    write_pages(folder, md, title, blocks)


# ---------------------------------------------------------------- run report


def write_run_report(folder: str | os.PathLike, info_text: str, metrics: list[dict]) -> dict[str, Path]:
    """report.html (self-contained) and report.md of one run folder (train, finetune, analyze): what
    it recorded (`info_text`, from the run's records), its training curve, and every plot it holds."""
    on_main(lambda: _write_run_report(Path(folder), info_text, metrics))  # torchrun: rank 0 writes
    return report_paths(Path(folder))


def _write_run_report(folder: Path, info_text: str, metrics: list[dict]) -> None:
    figs: Figures = []
    if metrics:
        figs.append(("Training: loss and accuracy per epoch", plot_training(metrics, folder / "training.png")))
    for p in sorted(folder.glob("*.png")):
        if p.name != "training.png":
            figs.append((p.stem.replace("-", " "), p))
    md = [f"# advtune run: {folder.name}", "", "```", info_text, "```", ""] + markdown_figures(figs)
    esc = html.escape
    title = f"advtune run: {folder.name}"
    write_pages(folder, md, title, [f"<h1>{esc(title)}</h1><pre>{esc(info_text)}</pre>", figures_html(figs)])

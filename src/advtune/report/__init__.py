"""Reports and plots from a run's records: an experiment's report (`write_report`), a harden run's
(`write_harden_report`), one run's (`write_run_report`), and the PNG plots the jobs draw.

    records.py           what each report reads from each record file, checked as it is read
    costs.py             the one cost basis (total_cost, total_wall)
    narrative.py         the words: what a variant was, the lead, the findings, the harden sentences
    tables.py            the tables as rows of text
    plots.py             figures of one run, and the figure helpers
    experiment_plots.py  the experiment's figures comparing its variants
    page.py              report.md and the one self-contained HTML page
    writers.py           the three reports"""

from .costs import COST_BASIS, total_cost, total_wall
from .experiment_plots import (
    matplotlib_colors,
    plot_eps_sweep,
    plot_frontier,
    plot_pareto,
    plot_trained_units,
    variant_colors,
)
from .narrative import describe, describe_short, headline, lead, short_layer_names, where_trained
from .plots import plot_concentration, plot_eps_curve, plot_selection, plot_training, plot_unit_scores
from .writers import write_harden_report, write_report, write_run_report

__all__ = [
    "COST_BASIS",
    "describe",
    "describe_short",
    "headline",
    "lead",
    "matplotlib_colors",
    "plot_concentration",
    "plot_eps_curve",
    "plot_eps_sweep",
    "plot_frontier",
    "plot_pareto",
    "plot_selection",
    "plot_trained_units",
    "plot_training",
    "plot_unit_scores",
    "short_layer_names",
    "total_cost",
    "total_wall",
    "variant_colors",
    "where_trained",
    "write_harden_report",
    "write_report",
    "write_run_report",
]

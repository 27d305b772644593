"""The report's tables as rows of text: one row per experiment variant (what it was, its accuracies,
its cost on the report's one basis), and a harden run's before/after."""

from __future__ import annotations

from ..evaluation.gate import gate_word
from .costs import total_wall, total_words
from .narrative import describe


def fmt_int(v) -> str:
    return f"{int(v):,}" if v is not None else "–"


def results_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per variant: what it was (method, selection, trainable parameters, data, budget), its
    accuracies, and its cost on the report's one basis (`total_cost`) next to its own training."""
    attack_cols = []
    for r in rows:
        attack_cols += [k for k in r if k.startswith("acc[") and k not in attack_cols]
    several_eps = len({r["eps"] for r in rows}) > 1
    head = [
        "variant",
        "what it is",
        *(["eps"] if several_eps else []),
        "trainable params",
        "training data",
        "budget",
        "clean",
        *[c[4:-1] for c in attack_cols],
        "worst case",
        "own grad evals",
        "total grad evals",
        "total wall s",
        "gate",
    ]
    body = []
    for r in rows:
        n, share = r.get("trainable_params"), r.get("param_share")
        params = fmt_int(n) + (f" ({100 * share:.1f}%)" if n and share is not None and share < 0.9995 else "")
        data = f"{int(r['train_examples']):,} images" if r.get("train_examples") else "all training images"
        if r["kind"] == "standard" and not r.get("train_examples") and "train_examples" not in r:
            data = "–"  # a record from before this column existed
        budget = (
            fmt_int(r["budget"])
            if r.get("budget")
            else (f"{r['epochs']} epoch{'s' * (r['epochs'] != 1)}" if r.get("epochs") else "–")
        )
        body.append(
            [
                r["variant"],
                describe(r),
                *([f"{r['eps']:.4g}"] if several_eps else []),
                params,
                data,
                budget,
                f"{100 * r['clean_acc']:.2f}%",
                *[f"{100 * r[c]:.2f}%" if c in r else "–" for c in attack_cols],
                f"{100 * r['robust_acc']:.2f}%",
                fmt_int(r["grad_evals"]) if r.get("base_recorded") is not False else "not recorded",
                total_words(r),
                f"{total_wall(r):.0f}",
                gate_word(r.get("suspect"), r.get("eval_attacks"), probed=r["clean_acc"] > 0)
                if r.get("eval_attacks")
                else ("SUSPECT" if r.get("suspect") else "passed"),  # a row from before its attacks were recorded
            ]
        )
    return head, body


def harden_table(s: dict) -> tuple[list[str], list[list[str]]]:
    """A harden run's clean and worst-case robust accuracy, and the gate, before and after."""
    head = ["", "clean", "worst-case robust", "gate"]
    body = [
        [
            label,
            f"{100 * s[k]['clean_acc']:.2f}%",
            f"{100 * s[k]['robust_acc']:.2f}%",
            gate_word(s[k].get("suspect"), s.get("evaluation"), s[k]["clean_acc"] > 0, s.get("norm") or "linf"),
        ]
        for label, k in (("before (base model)", "before"), ("after (hardened)", "after"))
    ]
    return head, body

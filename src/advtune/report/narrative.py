"""The report's words, computed from the records: what a variant was, the lead (what won and at what
cost), the findings, and the sentences of the experiment and harden reports. No claim is written that
the numbers don't make."""

from __future__ import annotations

import os
from typing import Mapping

from ..evaluation.gate import gate_word
from ..frontier import AT_REFERENCE_PROTOCOL
from ..recipe import ADAPTER_GRANULARITIES, rule_words
from ..train.config import REGROW_END
from .comparable import mixed_protocols, protocol_of
from .costs import base_unrecorded, total_cost


def short_layer_names(names: list[str]) -> dict[str, str]:
    """Layer names without the dotted prefix they all share ("net.conv1" -> "conv1"): readable labels."""
    parts = [n.split(".") for n in names]
    common = os.path.commonprefix(parts) if len(parts) > 1 else parts[0][:-1] if parts else []
    k = len(common) if all(len(p) > len(common) for p in parts) else 0
    return {n: ".".join(p[k:]) for n, p in zip(names, parts)}


def where_trained(by_layer: Mapping[str, list] | None, adapters: bool = False) -> str:
    """ "conv1 32/32, conv2 8/64": the layers a selection touches, units trained of units in the layer.
    With ``adapters`` (a low-rank or hybrid selection, whose counts are ranks of largest ranks):
    "conv1, conv2 whole; rank 7 on fc1, rank 3 on fc2"."""
    if not by_layer:
        return ""
    short = short_layer_names(list(by_layer))
    if not adapters:
        return ", ".join(f"{short[n]} {u}/{t}" for n, (u, t) in by_layer.items() if u)
    whole = [short[n] for n, (r, m) in by_layer.items() if r and r == m]
    ranked = [f"rank {r} on {short[n]}" for n, (r, m) in by_layer.items() if r and r != m]
    return "; ".join(p for p in (", ".join(whole) + " whole" if whole else "", ", ".join(ranked)) if p)


def describe(r: dict) -> str:
    """What a variant was, in words, from its row: method, selection and where its trained units sit."""
    kind, attack = r["kind"], r.get("attack")
    if kind == "standard":  # a base brought in (weights, a fine-tuned base) was described as standard training
        unknown = r.get("base_recorded") is False
        return (
            "the base model (brought in: how it trained is not recorded)"
            if unknown
            else "the base model: standard training"
        )
    if kind == "train":
        what = f"adversarial training from scratch with {attack}" if attack else "standard training from scratch"
    elif r.get("select") == "all":
        what = f"adversarial fine-tuning of all parameters with {attack}"
    else:
        if r.get("select") == "random" and r.get("granularity") == "sparse":
            what = "control: random single entries (by layer size, no score)"
            if r.get("regrow"):  # random to start; the moves grow by the gradients' score
                what = "control: random single entries to start (by layer size)"
            if r.get("norms"):
                what += ", and the normalization layers' scale and shift"
            if r.get("head"):  # as the rule it controls (round 45 on; before, the head's count went to random entries)
                what += ", and the output layer whole"
        elif r.get("select") == "random":
            if r.get("params_like"):
                what = f"control: random units with as many parameters as {r['params_like']}"
            elif r.get("share") is not None:
                what = f"control: a random {100 * r['share']:g}% of the units"
            else:
                what = f"control: random units within {_budget_words(r.get('params_budget'))} of the parameters"
        else:
            crit = r.get("criterion")
            if r.get("granularity") == "layer":
                what = f"whole layers ranked by {crit}"
            elif r.get("granularity") == "hybrid":
                what = f"the best whole layers by {crit} plus low-rank adapters on the others"
            elif r.get("granularity") == "shares":
                what = f"every layer's share of the budget by {crit}: whole where it pays, else an adapter"
            elif r.get("granularity") == "quota":
                what = f"top units by {crit} in every layer, quotas by the layers' scores"
            elif r.get("granularity") == "sparse":
                what = f"single weight entries of every layer by adversarial Fisher, quotas by {crit}"
            elif r.get("granularity") == "probe":
                how = f"quotas by {crit}" if r.get("probe_quotas") else "biases whole"
                what = f"the weight entries a whole-network probe (the budget's first share) moved most, {how}"
            elif r.get("granularity") == "lowrank":
                what = "low-rank adapters on every layer" + (f", ranks by {crit}" if crit else "")
            elif r.get("share") is not None:
                what = f"the top {100 * r['share']:g}% of units by {crit}"
            else:
                what = f"top units by {crit}"
            if r.get("norms"):
                what += ", and the normalization layers' scale and shift"
            if r.get("head"):
                what += ", and the output layer whole"
            if r.get("share") is None and r.get("params_budget") is not None:
                what += f", within {_budget_words(r['params_budget'])} of the parameters"
        what += f"; fine-tuned with {attack}"
        if r.get("regrow"):  # the mask moved within its budget (train/regrow.py): another method than a fixed one
            score = f", grown by {r['regrow_score']}" if r.get("regrow_score") not in (None, "movement") else ""
            score += ", window moments" if r.get("regrow_moments") == "window" else ""
            score += ", regrown across layers" if r.get("regrow_pool") == "global" else ""
            score += ", dropped by change per step" if r.get("regrow_drop") == "per-step" else ""
            score += f", grown entries' steps x{r['regrow_rate']:g}" if r.get("regrow_rate") not in (None, 1) else ""
            end = r.get("regrow_end")
            score += f", moving until {100 * end:g}% of the run" if end not in (None, REGROW_END) else ""
            what += f", the mask moving (regrow {r['regrow']:g}{score})"
    where = where_trained(r.get("selected_by_layer"), r.get("granularity") in ADAPTER_GRANULARITIES)
    if where and r.get("granularity") in ("sparse", "probe"):  # its counts are entries, not units
        where += " entries"
    return what + (f"; trains {where}" if where else "")


def _budget_words(p) -> str:
    if p is None:
        return "?"
    p = float(p)
    return f"{100 * p:g}%" if p <= 1 else f"{int(p):,}"


def describe_short(r: dict) -> str:
    """A variant and its trainable parameters, for a legend."""
    n = r.get("trainable_params")
    return f"{r['variant']}: {n:,} params" if n else r["variant"]


def lead(rows: list[dict]) -> list[str]:
    """The report's first lines: what won and at what cost, then selective vs full fine-tuning vs the
    random control vs adversarial training, all on the `total_cost` basis. Computed from the rows; a
    variant that tripped the gradient-masking gate is never called the winner."""
    out = []
    by_eps: dict[float, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r)
    mixed = mixed_protocols(rows)
    for eps, rs in sorted(by_eps.items()):
        at = f"at eps={eps:g}"
        ok = [r for r in rs if not r.get("suspect") and r["kind"] != "standard"]
        if not ok:
            continue
        if eps in mixed:  # a weak attack's number is no match for a strong one's: no winner, no cost share
            out.append(
                f"No winner is named {at}: its rows were measured with different protocols (the evaluation line "
                "names them); rerun them with one evaluation to compare them."
            )
            continue
        win = max(ok, key=lambda r: (r["robust_acc"], -total_cost(r)))
        spent = (
            f"{total_cost(win):,} gradient evaluations after its base model (whose training cost is not recorded)"
            if base_unrecorded(win)
            else f"{total_cost(win):,} gradient evaluations in total"
        )
        base = next((r for r in rs if r["kind"] == "standard"), None)  # where every variant started from
        started = f"; the base model's worst case {100 * base['robust_acc']:.2f}%" if base else ""
        out.append(
            f"**{win['variant']} won** {at}: {100 * win['robust_acc']:.2f}% worst-case robust accuracy (clean "
            f"{100 * win['clean_acc']:.2f}%{started}) for {spent} — {describe(win)}."
        )
        if base and win["robust_acc"] <= base["robust_acc"]:  # the winner of a field that made the model worse
            out.append(f"No variant beat the base model's {100 * base['robust_acc']:.2f}% {at}.")
        sel = [r for r in ok if selective(r)]
        full = [r for r in ok if r["kind"] == "finetune" and r.get("select") == "all"]
        at_ = [r for r in ok if r["kind"] == "train" and r.get("attack")]
        if not sel:
            continue
        best = max(sel, key=lambda r: r["robust_acc"])
        share = f"{100 * best['param_share']:.1f}% of the parameters" if best.get("param_share") else "a selection"
        parts = [f"Selective fine-tuning of {share} (**{best['variant']}**) reached {100 * best['robust_acc']:.2f}%"]
        if at_:
            ref = max(at_, key=lambda r: r["robust_acc"])
            versus = f"**{ref['variant']}**: {100 * ref['robust_acc']:.2f}%"
            if base_unrecorded(best) or not total_cost(ref):  # a share of an unknown is no number
                unknown = "its base model's training" if base_unrecorded(best) else "adversarial training's"
                parts[0] += f" (adversarial training, {versus}; no cost share: {unknown} cost is not recorded)"
            else:
                ratio = total_cost(best) / total_cost(ref)
                parts[0] += f" at {percent(ratio)} of the cost of adversarial training ({versus})"
        if full:
            f = max(full, key=lambda r: r["robust_acc"])
            ratio = total_cost(f) / max(total_cost(best), 1)
            parts.append(
                f"full-network fine-tuning (**{f['variant']}**) {100 * f['robust_acc']:.2f}% "
                f"(at {f'{ratio:.2g}' if ratio < 99.5 else f'{ratio:,.0f}'}x the selective cost)"
            )
        for r in ok:
            if r["kind"] == "finetune" and r.get("select") == "random" and r.get("params_like") == best["variant"]:
                parts.append(
                    f"{_random_kind(r)} with as many trainable parameters (**{r['variant']}**) "
                    f"{100 * r['robust_acc']:.2f}%"
                )
        out.append("; ".join(parts) + ".")
    return out


def percent(ratio: float) -> str:
    """A cost share as a percentage that never rounds a real cost to "0%" (0.3% stays 0.3%), with a decimal under 100%:
    the parity target is a share (25% of AT's cost), and 25.2% printed as "25%" read as inside it."""
    if ratio == 0 or 100 * ratio >= 100:
        return f"{100 * ratio:.0f}%"
    return f"{100 * ratio:.1f}%" if 100 * ratio >= 0.1 else "<0.1%"


def selective(r: dict) -> bool:
    """A row of the method: a fine-tuning of the analysis' selection, or `advtune harden` itself (kind: harden)."""
    return r["kind"] == "harden" or (r["kind"] == "finetune" and r.get("select") == "top")


def _random_kind(r: dict) -> str:
    """What a random control draws: single weight entries (the sparse and probe rules' control) or units."""
    return "random single entries" if r.get("granularity") == "sparse" else "random units"


def headline(rows: list[dict], frontier: bool = False) -> list[str]:
    """Plain-language findings, computed from the rows (no claim is written that the numbers don't make):
    the lead (what won, at what cost), gate warnings, and each random control against the selection it
    controls. `frontier` is kept for callers; the lead counts costs like the frontier does."""
    out = lead(rows)
    by_eps: dict[float, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r)
    mixed = mixed_protocols(rows)
    for eps, rs in sorted(by_eps.items()):
        sel = [r for r in rs if selective(r) and not r.get("suspect") and eps not in mixed]
        rnd = [r for r in rs if r["kind"] == "finetune" and r.get("select") == "random" and not r.get("suspect")]
        for r in rs:
            if r.get("suspect"):
                out.append(
                    f"eps={eps:g}: **{r['variant']}** tripped the gradient-masking gate ({r['suspect']}); "
                    "its robust accuracy is not trustworthy and it is not called robust here."
                )
        for r in rnd if sel else []:
            n = r.get("trainable_params") or 0
            if r.get("params_like"):  # the control of one named selection: compare with that one
                same = [s for s in sel if s["variant"] == r["params_like"]]
                what, ctrl = f"with ~{n:,} trainable parameters", f"{_random_kind(r)} with as many parameters"
            elif r.get("share") is not None:  # the same share of components, same attack and budget
                same = [
                    s
                    for s in sel
                    if s.get("share") == r["share"]
                    and s.get("attack") == r.get("attack")
                    and s.get("grad_evals") == r.get("grad_evals")
                ]
                what, ctrl = f"at share {r['share']:g}", "the same share of units chosen at random"
            else:  # the same trainable parameters (within 10%), attack and budget
                same = [
                    s
                    for s in sel
                    if s.get("attack") == r.get("attack")
                    and s.get("trainable_params")
                    and abs(s["trainable_params"] - n) <= 0.1 * s["trainable_params"]
                    and s.get("grad_evals") == r.get("grad_evals")
                ]
                what, ctrl = f"with ~{n:,} trainable parameters", f"{_random_kind(r)} with as many parameters"
            if same:
                s = max(same, key=lambda q: q["robust_acc"])
                matched = ""
                if s.get("trainable_params") and n and abs(s["trainable_params"] - n) > 0.1 * s["trainable_params"]:
                    matched = (
                        f" (not matched on parameters: the control trains {n:,}, the selection "
                        f"{s['trainable_params']:,})"
                    )
                out.append(
                    f"eps={eps:g}: {what}, selected components ({s['variant']}) gave {100 * s['robust_acc']:.2f}% "
                    f"vs {100 * r['robust_acc']:.2f}% for {ctrl} "
                    f"({100 * (s['robust_acc'] - r['robust_acc']):+.1f} points){matched}."
                )
    return out


# ---------------------------------------------------------------- the experiment report's sentences


def experiment_setup(cfg: dict) -> str:
    """The base model of an experiment, from its config."""
    base = cfg.get("base") or {}
    return (
        f"Base: {base.get('pretrained') or (str(base.get('model')) + ' on ' + str(base.get('dataset')))}"
        + (f", training subset {base['limit']}" if base.get("limit") else "")
        + "."
    )


def experiment_protocol(cfg: dict, rows: list[dict]) -> str:
    """The threat model and the evaluation of an experiment."""
    ev = cfg.get("evaluation") or {}
    threat = cfg.get("threat") or {}
    text = (
        f"Threat model {threat.get('norm', 'linf')}, eps {threat.get('eps')}. "
        f"Evaluation: {ev.get('suite') or ev.get('attacks')} on the first {rows[0].get('eval_examples')} test images; "
        "worst case per example over the attacks; the gradient-masking gate ran on every model"
        + (
            _gate_reason(gate_word(None, rows[0]["eval_attacks"], norm=threat.get("norm", "linf")))
            if rows and rows[0].get("eval_attacks")
            else "."
        )
    )
    # each row's own record says what measured it: rows of another protocol (a folder from before experiments
    # refused a changed evaluation) are named, not described by the first row's
    protocols: dict[tuple, list[str]] = {}
    for r in rows:
        protocols.setdefault(protocol_of(r), []).append(str(r.get("variant")))
    if len(protocols) > 1:
        text += (
            " Not comparable as they stand: the rows were measured with different protocols ("
            + "; ".join(f"{', '.join(names)}: {attacks} on {n} images" for (attacks, n), names in protocols.items())
            + ")."
        )
    return text


# ---------------------------------------------------------------- the harden report's sentences


def harden_title(s: dict) -> str:
    return f"advtune harden: {s['architecture']} at {s['norm']} eps={s['eps']:g}"


def harden_lead(s: dict) -> str:
    """What hardening did and what it cost, in one sentence."""
    c = s["cost"]
    sel = s.get("selection") or {}
    share = 100 * (s.get("param_share") or 0)
    choice = f" + choosing the checkpoint {c['checkpoint_grad_evals']:,}" if c.get("checkpoint_grad_evals") else ""
    base = c.get("base_training_grad_evals")  # None: the base model came without a cost record (not zero)
    base = f"the base model's own training took {base:,}" if base is not None else "the base model's cost is unrecorded"
    changed = sel.get("changed_params", 0)  # adapters: their factors train, the layers they merge into change
    changed = f", changing {changed:,} entries of the weights," if changed > sel.get("trainable_params", 0) else ""
    suspect = (s.get("after") or {}).get("suspect")  # the gate's word comes first: the numbers may be masked
    suspect = "; ".join(suspect) if isinstance(suspect, list) else suspect
    flagged = f" The masking gate flagged the hardened model ({suspect}): do not call it robust until a stronger "
    flagged = flagged + "evaluation agrees." if suspect else ""
    return (
        f"Selective adversarial fine-tuning of {sel.get('trainable_params', 0):,} parameters ({share:.2f}% of the "
        f"model){changed} "
        f"took worst-case robust accuracy at {s['norm']} eps={s['eps']:g} from {100 * s['before']['robust_acc']:.2f}% "
        f"to {100 * s['after']['robust_acc']:.2f}% (clean {100 * s['before']['clean_acc']:.2f}% -> "
        f"{100 * s['after']['clean_acc']:.2f}%), for {c['harden_grad_evals']:,} gradient evaluations "
        f"(analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,}{choice}); {base}.{flagged}"
    )


def harden_recipe(s: dict) -> str:
    """The recipe a harden run used, from its summary."""
    recipe = s.get("recipe") or {}
    g = recipe.get("granularity")
    norms = " + the normalization layers' scale and shift" if recipe.get("norms") else ""
    norms += " + the output layer whole" if recipe.get("head") else ""
    ranked = "" if g == "probe" else f" ranked by {recipe.get('criterion')}"  # the probe's mask: by movement
    ramp = f"eps ramped over {100 * float(recipe.get('eps_warmup', 0)):g}% of the budget"
    if g == "probe":
        ramp = f"the whole network for the first {100 * float(recipe.get('probe', 0.2)):g}% of the budget ({ramp})"
    if recipe.get("regrow"):
        norms += f", the mask moving (--regrow {recipe['regrow']:g}: drop and regrow within its budget)"
    return (
        f"Recipe: {rule_words(g, recipe.get('probe_quotas', False) is not False)}{norms}{ranked} "
        f"(analysis: {recipe.get('analysis_attack')} on {s.get('analysis_examples') or recipe.get('analysis_limit')} "
        "training images) within "
        f"{_budget_words(recipe.get('params'))} of the parameters; fine-tuning with {recipe.get('attack')}, {ramp}, "
        f"{recipe.get('optimizer')} lr "
        f"{recipe.get('lr')}, "
        f"{recipe.get('schedule')} schedule, batch {recipe.get('batch_size')}, "
        f"{'no' if recipe.get('augment', 'none') == 'none' else recipe['augment']} augmentation; "
        f"budget {s['budget']:,} gradient evaluations."
    )


def harden_protocol(s: dict) -> str:
    return (
        f"Evaluation: worst case per example of {s['evaluation']} on the first {s['test_examples']} test images "
        "(the same images before and after), gradient-masking gate on"
        + _gate_reason(gate_word(None, s["evaluation"], norm=s.get("norm") or "linf"))
    )


def _gate_reason(word: str) -> str:
    """The end of a protocol sentence: why the gate's black-box check did not run, where it did not."""
    if word == "passed (black-box attacks only)":
        return " (without its black-box check: no gradient attack ran to compare the black-box one with)."
    if word == "passed (no black-box check)":
        return " (without its black-box check: no black-box attack in the evaluation)."
    return "."


def counted(sel: dict) -> str:
    """What a selection's per-layer counts (by_layer) count: a sparse mask's weight entries, adapters' ranks
    (of the layer's largest rank), or units."""
    if sel.get("kind") == "sparse":
        return "weight entries"
    return "adapter ranks" if sel.get("kind") in ("lowrank", "hybrid") else "units"


def harden_layers(s: dict) -> list[str]:
    """One line per layer the selection trains: units (entries, ranks) and parameters."""
    sel = s.get("selection") or {}
    what = counted(sel)
    return [
        f"{n}: {u}/{t} {what}, {(sel.get('params_by_layer') or {}).get(n, 0):,} parameters"
        for n, (u, t) in (sel.get("by_layer") or {}).items()
        if u
    ]


def harden_comparisons(s: dict) -> list[str]:
    """What a harden run's summary says beyond before/after, one sentence each (harden's printout and its report):
    the checkpoint its held-out split chose, its cost against adversarial training on the same setting, and its
    robustness against the full-network fine-tuning control there (where the frontier measured them)."""
    c, out = s["cost"], []
    if s.get("checkpoints"):
        k = s["checkpoints"]
        curve = ", ".join(f"{p['step']}: {100 * p['robust_acc']:.1f}%" for p in k["curve"])
        kept = (
            f"the checkpoint of step {k['chosen_step']}"
            if k["chosen_step"]
            else "the last weights (the best were lost)"
        )
        out.append(
            f"kept {kept}, chosen under {k['attack']} on {k['examples']} held-out training examples "
            f"(step: robust {curve}; {k['grad_evals']:,} gradient evaluations)"
        )
    ref = s.get("at_reference")
    if ref and "robust_acc" not in ref:  # a setting where only the full fine-tuning control was measured
        out.append("against adversarial training: not measured on this setting (the frontier ran it on others)")
    elif ref:
        base = c["base_training_grad_evals"]  # None: unrecorded (weights brought in, a fine-tuned base, the API)
        total = (base or 0) + c["harden_grad_evals"]
        cost = (
            f"this model cost {total:,} with its base training ({percent(total / ref['plateau_grad_evals'])} of that)"
            if base is not None
            else f"hardening cost {total:,}; the base model's own training is unrecorded, so no share of that is given"
        )
        out.append(
            f"against adversarial training: on this setting {ref.get('method', 'PGD-AT')} from scratch "
            f"{'plateaus at' if ref.get('plateau', True) else 'reaches (still rising)'} "
            f"{100 * ref['robust_acc']:.1f}% for {ref['plateau_grad_evals']:,} gradient evaluations (the frontier's "
            f"reference, {ref['source'].split(' ')[0]}, measured with {ref.get('protocol', 'APGD-CE + APGD-T')}); "
            + cost
        )
    examples = s.get("test_examples")
    # not like for like (0: harden had no test data to evaluate on, so nothing of this model is compared)
    if ref and "robust_acc" in ref and examples and examples != REFERENCE_TEST_IMAGES:
        out[-1] += f" (the references on the first {REFERENCE_TEST_IMAGES} test images, this model on {examples})"
    if ref and ref.get("full_ft") and s.get("after"):
        out.append(full_ft_comparison(ref, s["after"], c["harden_grad_evals"], examples))
    return out


REFERENCE_TEST_IMAGES = 1000  # every frontier reference was measured on the first 1000 test images (frontier.py)


REACH = 1.25  # a control speaks for compute up to a quarter past its last point, not further


def full_ft_comparison(ref: dict, after: dict, spent: int, examples: int | None = None) -> str:
    """harden's line against the full-network fine-tuning control of its setting (`ref`: the setting's entry of
    AT_REFERENCES, with `full_ft`, and `full_ft_longer` where the model spent past `full_ft`'s reach): the control's
    curve, and its best point at no more compute than `spent` (what
    the hardened model cost after its standard model) against the model's worst case `after` -- only where the
    model's evaluation includes the references' attacks (APGD-CE and APGD-T), Square or not (said)."""
    main, longer = ref["full_ft"], ref.get("full_ft_longer")
    # past the main control's reach the longer one is shown, and the best point at no more compute is both's best
    controls = [main, longer] if longer and spent > REACH * main["curve"][-1][0] else [main]
    full = controls[-1]  # the control whose curve the line shows
    points = [(int(g), float(r), c["variant"]) for c in controls for g, r in c["curve"]]
    curve = [(int(g), float(r)) for g, r in full["curve"]]
    attacks = list(after.get("accuracy") or {})
    square = any(a.startswith("square") for a in attacks)
    line = (
        f"against full-network fine-tuning: measured on this setting, adversarial fine-tuning of every weight of "
        f"a standard model ({full['recipe']}) reached {' / '.join(f'{100 * r:.1f}%' for _, r in curve)} at "
        f"{' / '.join(f'{g:,}' for g, _ in curve)} gradient evaluations after it ({full['source']}, {full['variant']}, "
        f"{ref.get('protocol', AT_REFERENCE_PROTOCOL)}); this model {100 * after['robust_acc']:.1f}%"
        f"{' (its evaluation adds Square)' if square else ''} for {spent:,} after its standard model (analysis, "
        "fine-tuning, checkpoint choice)"
    )
    comparable = any(a.startswith("apgd-ce") for a in attacks) and any(a.startswith("apgd-t") for a in attacks)
    within = [(r, variant) for g, r, variant in points if g <= spent]
    if not comparable:
        return line + "; not compared: this model's evaluation lacks APGD-CE or APGD-T"
    if after.get("suspect"):
        return line + "; not compared: the masking gate flagged this model's evaluation"
    if examples not in (None, REFERENCE_TEST_IMAGES):
        return line + f"; not compared: measured on {examples} test images, the control on {REFERENCE_TEST_IMAGES}"
    if spent > REACH * curve[-1][0]:  # far past the control's last point: that point would understate it
        return line + f"; not compared: the control was measured only up to {curve[-1][0]:,}"
    if not within:
        return line
    best, variant = max(within)
    gap = 100 * (best - after["robust_acc"])
    where = "above" if gap >= 0 else "below"
    named = f" ({variant}'s)" if variant != full["variant"] else ""
    return line + f": the control's best point at no more compute, {best:.1%}{named}, is {abs(gap):.1f} points {where}"

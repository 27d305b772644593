"""bench/gradual_probe.py (#21, round 22): the gradual cut of the change keeps what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def gradual(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import gradual_probe

    return gradual_probe


def test_the_cut_shrinks_to_the_budget_and_holds_every_dropped_entry_at_the_base(gradual):
    from advtune.components import output_layer
    from advtune.data import load_dataset
    from advtune.models import model_for
    from advtune.train.lowrank import adaptable_layers, own_params

    torch.manual_seed(0)
    ds = load_dataset("synthetic", limit=16, limit_test=4)
    model = model_for(ds, "small-cnn")
    head = [output_layer(model, ds.train.to_float(ds.train.x[:1]))]
    scores = {n: float(i + 1) for i, n in enumerate(adaptable_layers(model)) if n not in head}
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    final = total // 20
    cut = gradual.GradualCut(model, base, final, scores, head, (), start=0.1, end=0.5, every=0.05)
    assert cut.entries_at(0.0) == cut.total == total and cut.entries_at(0.5) == cut.entries_at(0.9) == final
    kept = []
    for step in range(21):  # training moves every entry; the cut takes the mask again on schedule
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        cut.update(step / 20)
        kept.append(sum(int(m.sum()) for m in cut.mask.values()))
        for name, p in model.named_parameters():  # outside the mask: the base's value, bit for bit
            assert torch.equal(p[~cut.mask[name]], base[name][~cut.mask[name]])
    assert kept[0] == total and all(a >= b for a, b in zip(kept, kept[1:]))  # it only shrinks
    assert kept[-1] <= final and cut.changed() <= final
    assert all(bool(cut.mask[f"{head[0]}.{n}"].all()) for n, _ in model.get_submodule(head[0]).named_parameters())
    assert cut.changed() > own_params(model.get_submodule(head[0]))  # the scored layers got the rest
    model.zero_grad()
    sum(p.sum() for p in model.parameters()).backward()
    for name, p in model.named_parameters():  # dropped entries get no gradient (Adam's moments decay to nothing)
        assert torch.equal(p.grad, cut.mask[name].to(p.grad.dtype))

"""The probe rule with a path-integral score instead of the probe's movement (issue 21, round 36): does ranking the
entries by how much of the probe's loss decrease they carried pick a better 10% than ranking them by how far they
moved? Measured on the VALIDATION split (bench/val_select.py), never on test.

The probe rule (train/probe.py, RESULTS round 18) fine-tunes the whole network for 20% of the budget, keeps the
entries that moved most, |W_probe - W_base| (within the analysis' per-layer quotas), puts every other entry back to
the base and trains the rest of the budget within that mask. Under Adam an entry's step is about lr * m / sqrt(v):
its size is set by how *consistent* the gradient's sign is, not by how much the loss cares, so |W_probe - W_base|
is blind to the gradient's magnitude (an entry nudged the same way every step with a tiny gradient moves as far as
one the loss leans on). Synaptic Intelligence (Zenke, Poole and Ganguli, "Continual Learning Through Synaptic
Intelligence", ICML 2017; from memory, not retrieved) scores a parameter by its contribution to the loss decrease
along the training path, omega_i = sum_t -g_i(t) * (W_i(t+1) - W_i(t)), the first-order path integral of the loss
change; movement pruning's score (Sanh, Wolf and Rush 2020, from memory) is a relative of it. Here omega is summed
over the probe's optimizer steps (the raw weights, not the weight average) and takes |W_probe - W_base|'s place in
the same per-layer quotas; everything else is harden's rule (`advtune finetune --granularity probe`).

    python bench/si_probe.py runs/std --select runs/analysis --eps 8/255 ... --out runs/si   # finetune's flags
    python bench/val_select.py runs/si --eps 8/255 --n 1000

The script runs `advtune finetune` itself with the flags given (one sitting: it is not resumable, since omega is
not checkpointed; --granularity probe and --probe-quotas are required), with two hooks: every optimizer step of the
probe stage adds -g * dW to omega (torch's global optimizer step hooks, removed when the probe ends), and the mask's
entry scores are omega. The run folder is an ordinary finetune folder plus `si-probe.json` (the rule's record).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import advtune.runs.probe as probe_stage
from advtune.cli import main
from advtune.storage import atomic_write_json
from advtune.train.probe import masked_params, movement_scores  # noqa: F401  (the rule the bench stands in for)


class PathIntegral:
    """omega for every parameter the optimizers step while it listens: -g * dW summed over steps (the gradient the
    step used, the raw weights before and after it)."""

    def __init__(self) -> None:
        self.omega: dict[int, torch.Tensor] = {}
        self.before: dict[int, torch.Tensor] = {}
        self.steps = 0
        self.handles = [
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]

    def _params(self, opt):
        return [p for group in opt.param_groups for p in group["params"] if p.grad is not None]

    def _pre(self, opt, args, kwargs) -> None:
        for p in self._params(opt):
            self.before[id(p)] = p.detach().clone()

    @torch.no_grad()
    def _post(self, opt, args, kwargs) -> None:
        for p in self._params(opt):
            step = p.detach() - self.before.pop(id(p))
            omega = self.omega.setdefault(id(p), torch.zeros_like(p, dtype=torch.float32))
            omega -= (p.grad * step).float()
        self.steps += 1

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def scores(self, model) -> dict[str, torch.Tensor]:
        """omega by name for the entries the mask chooses among (conv/linear weights and biases), on the CPU."""
        missing = [n for n, p in masked_params(model) if id(p) not in self.omega]
        if missing:
            raise SystemExit(f"si_probe: no optimizer step touched {missing[0]}; was the probe resumed from a folder?")
        return {n: self.omega[id(p)].cpu() for n, p in masked_params(model)}


def run(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):  # its own words first, then the flags it passes on: advtune finetune's
        print(
            __doc__.split("\n\n")[0] + "\n\nusage: python bench/si_probe.py <advtune finetune's flags, with "
            "--granularity probe --probe-quotas>; advtune finetune --help lists them"
        )
        return 0
    flags = argparse.ArgumentParser(add_help=False)  # the few of finetune's flags the bench must see
    for name in ("--granularity", "--out"):
        flags.add_argument(name)
    for name in ("--resume", "--no-probe-quotas"):
        flags.add_argument(name, action="store_true")
    seen, _ = flags.parse_known_args(argv)
    if seen.resume or seen.granularity != "probe":
        raise SystemExit("si_probe: give finetune's flags with --granularity probe (one sitting: no --resume)")
    if seen.no_probe_quotas:
        raise SystemExit("si_probe: the score replaces the movement inside the per-layer quotas: keep --probe-quotas")
    integral = PathIntegral()

    def scores(base, moved):  # called once, when the probe has finished: the mask's entry scores
        integral.stop()
        return integral.scores(moved)

    movement = probe_stage.movement_scores
    probe_stage.movement_scores = scores
    try:
        rc = main(["finetune", *argv])
    finally:  # the library's rule again for whatever runs next in this process
        probe_stage.movement_scores = movement
        integral.stop()
    if rc == 0:
        out = Path(seen.out)
        atomic_write_json(
            out / "si-probe.json",
            {"score": "path integral: sum over the probe's steps of -g * dW", "probe_steps": integral.steps},
        )
    return rc


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

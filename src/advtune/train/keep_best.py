"""Keep the best checkpoint of a run, chosen on held-out training data (never the test split).

Robust accuracy peaks and then falls as adversarial training goes on (robust overfitting, Rice et
al. 2020), so the last weights are not always the best. `KeepBest` is a `fit` on_step callback: at
chosen steps it measures clean and robust accuracy on a held-out split under an attack, keeps the
weights of the best point (ties: the later one), and `restore` puts them back after training. With
a folder it records the curve and the best weights there, so a resumed run keeps what it measured.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..distributed import broadcast_state, is_distributed, is_main_process
from ..errors import AdvtuneError
from ..metrics import accuracy, robust_accuracy_quick
from ..storage import atomic_write_bytes, atomic_write_json, read_json
from .lowrank import adapter_factors, has_adapters, plain_state_dict

log = logging.getLogger(__name__)

CURVE = "keep-best.json"
WEIGHTS = "keep-best.safetensors"


MASK = "mask::"  # the prefix of a moving mask's entries kept next to the weights (--regrow)


class KeepBest:
    def __init__(
        self,
        data,
        attack,
        steps: list[int],
        *,
        label: str = "",
        folder=None,
        batch_size: int = 500,
        seed: int = 0,
        masks=None,
    ) -> None:
        """`masks`: with a mask that moves (--regrow), a callable giving its entries now ({name: bool tensor}); the
        best point's are kept with its weights, and `kept_masks` holds them after `restore`."""
        if data is None or len(data) == 0:
            raise AdvtuneError("keeping the best checkpoint needs held-out examples; give --val N (N >= 1)")
        self.data = data  # a TensorData split
        self.label = label or type(attack).__name__  # the attack's spec, for the record
        self.attack, self.steps, self.batch_size, self.seed = attack, sorted(set(steps)), batch_size, seed
        self.folder = Path(folder) if folder else None
        self.curve: list[dict] = []
        self.best_state: dict | None = None
        self.best_factors: dict | None = None  # the best point's low-rank adapters (for the patch)
        self.kept_last = False  # the best point's weights were lost: the run kept its last ones
        self.masks, self.kept_masks = masks, None
        if self.folder is not None and (self.folder / CURVE).is_file():  # a resumed run: what was measured
            curve = read_json(self.folder / CURVE, "checkpoint curve").get("curve", [])
            fields = {"robust_acc", "step"}
            if not isinstance(curve, list) or not all(isinstance(p, dict) and fields <= set(p) for p in curve):
                raise AdvtuneError(
                    f"{self.folder / CURVE} is not a checkpoint curve; delete keep-best.* there and rerun with "
                    "--resume (the choice is then among the points measured after)"
                )
            self.curve = curve

    @property
    def best(self) -> dict | None:
        """The best point so far (highest robust accuracy; the later on a tie)."""
        return max(reversed(self.curve), key=lambda p: p["robust_acc"], default=None)

    def grad_evals(self) -> int:
        """Gradient evaluations spent choosing (not training): the attack on every held-out example."""
        return len(self.curve) * len(self.data) * int(self.attack.grad_evals())

    def __call__(self, model, step: int, meter=None) -> None:
        if step not in self.steps or any(p["step"] == step for p in self.curve):
            return  # measured before a resume: its record (and, if best, its weights) are on file
        started = time.perf_counter()
        with rank0_buffers(model):  # under torchrun every rank measures (and keeps) one model: rank 0's
            point = {
                "step": step,
                "grad_evals": meter.grad_evals if meter is not None else None,
                "clean_acc": accuracy(model, self.data, self.batch_size),
                "robust_acc": robust_accuracy_quick(model, self.data, self.attack, self.batch_size, self.seed),
            }
            # what measuring it cost (the run's meter stops meanwhile): the attack's passes, a clean forward and
            # the attacked one, per held-out example
            point["wall_s"] = round(time.perf_counter() - started, 3)
            if meter is not None and meter.flops_attack_step:
                n = len(self.data)
                point["flops"] = n * (int(self.attack.grad_evals()) * meter.flops_attack_step + 2 * meter.flops_forward)
            self.curve = sorted([*self.curve, point], key=lambda p: p["step"])
            if self.best is point:
                state = plain_state_dict(model) if has_adapters(model) else model.state_dict()
                self.best_factors = adapter_factors(model) if has_adapters(model) else None
                self.best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
                if self.masks is not None:  # the entries this point may have changed: its mask, with its weights
                    for name, m in self.masks().items():
                        self.best_state[MASK + name] = m.detach().to("cpu", torch.bool, copy=True).contiguous()
                if self.folder is not None and is_main_process():  # the weights first, then the curve naming them
                    atomic_write_bytes(self.folder / WEIGHTS, save(self.best_state, metadata={"step": str(step)}))
        if self.folder is not None and is_main_process():
            atomic_write_json(self.folder / CURVE, self.record())

    def restore(self, model) -> int | None:
        """Load the best point's weights into `model` (its adapters merged already); its step."""
        best = self.best
        if best is None:
            return None
        state = self.best_state
        if state is None and self.folder is not None and (self.folder / WEIGHTS).is_file():
            try:
                with safe_open(str(self.folder / WEIGHTS), framework="pt") as f:  # measured before a resume
                    if (f.metadata() or {}).get("step") == str(best["step"]):
                        state = load_file(str(self.folder / WEIGHTS))
            except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
                raise AdvtuneError(
                    f"{self.folder / WEIGHTS} is truncated or corrupt ({str(e).splitlines()[0][:100]}); delete "
                    "it and rerun with --resume (the run then keeps its last weights)"
                ) from None
        if state is None:  # its weights are not on file (a crash between two writes): keep the last ones
            log.warning("the best checkpoint (step %d) was not kept on file; keeping the last weights", best["step"])
            self.kept_last = True
            return None
        device = next(model.parameters()).device
        masks = {k[len(MASK) :]: v for k, v in state.items() if k.startswith(MASK)}
        if self.masks is not None and not masks:
            raise AdvtuneError(f"{self.folder / WEIGHTS} has no mask for its moving-mask run; start a new run")
        self.kept_masks = masks or None
        model.load_state_dict({k: v.to(device) for k, v in state.items() if not k.startswith(MASK)})
        return best["step"]

    def record(self) -> dict:
        best = self.best
        return {
            "examples": len(self.data),
            "attack": self.label,
            "curve": self.curve,
            "chosen_step": best["step"] if best and not self.kept_last else None,  # None: the last weights
            "grad_evals": self.grad_evals(),
            # measured per point (records from before these fields: 0 for theirs)
            "wall_s": round(sum(p.get("wall_s", 0.0) for p in self.curve), 3),
            "flops": sum(p.get("flops", 0.0) for p in self.curve),
        }


@contextmanager
def rank0_buffers(model):
    """Under torchrun, rank 0's buffers (BatchNorm statistics, which the ranks only share at epoch
    ends) in the model for the duration, the rank's own put back after; the parameters are equal
    already. One process: nothing to do."""
    if not is_distributed():
        yield
        return
    own = [b.detach().clone() for b in model.buffers()]
    broadcast_state(model, buffers_only=True)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), own):
                b.copy_(v)

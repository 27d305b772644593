"""advtune: find the CNN components adversarial attacks exploit and fine-tune only those.

    import advtune
    result = advtune.evaluate(model, (x, y), eps=0.3)          # honest robustness, gate on
    vmap = advtune.analyze(model, train_loader, eps=0.3)        # which units the attack exploits
    hardened = advtune.harden(model, train_loader, eps=0.3, test=(x, y)).model

See docs/api.md. Names are imported on first use, so `import advtune` (and `advtune --help`) does
not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .version import VERSION

__version__ = VERSION

# public name -> module that defines it (one home each)
_EXPORTS = {
    # the four jobs, for any nn.Module and any (x, y) data
    "evaluate": "api",
    "analyze": "api",
    "harden": "api",
    "fit": "api",
    "VulnerabilityMap": "vulnerability",
    "load_model": "api",
    "save_model": "api",
    # your checkpoints in, a robustness patch out
    "load_checkpoint": "weights",
    "apply_patch": "patch",
    "write_patch": "patch",
    # results and settings
    "EvalResult": "evaluation",
    "suite": "evaluation",
    "eps_curve": "evaluation",
    "HardenResult": "api",
    "Recipe": "recipe",
    "TrainConfig": "train",
    "History": "train",
    "clean": "train",
    "adversarial": "train",
    "trades": "train",
    "ScoreTable": "vulnerability",
    "ConcentrationCurve": "vulnerability",
    "Selection": "components",
    "Component": "components",
    # threat model and attacks
    "ThreatModel": "threat",
    "Attack": "attacks",
    "FGSM": "attacks",
    "PGD": "attacks",
    "MIFGSM": "attacks",
    "APGD": "attacks",
    "APGDT": "attacks",
    "Square": "attacks",
    "build_attack": "attacks",
    "list_attacks": "attacks",
    # data and models
    "load_dataset": "data",
    "list_datasets": "data",
    "Dataset": "data",
    "TensorData": "data",
    "build_model": "models",
    "list_models": "models",
    "AdvtuneError": "errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily above
    from .api import (
        HardenResult,
        analyze,
        evaluate,
        fit,
        harden,
        load_model,
        save_model,
    )
    from .attacks import (
        APGD,
        APGDT,
        FGSM,
        MIFGSM,
        PGD,
        Attack,
        Square,
        build_attack,
        list_attacks,
    )
    from .components import Component, Selection
    from .data import Dataset, TensorData, list_datasets, load_dataset
    from .errors import AdvtuneError
    from .evaluation import EvalResult, eps_curve, suite
    from .models import build_model, list_models
    from .patch import apply_patch, write_patch
    from .recipe import Recipe
    from .threat import ThreatModel
    from .train import History, TrainConfig, adversarial, clean, trades
    from .vulnerability import ConcentrationCurve, ScoreTable, VulnerabilityMap
    from .weights import load_checkpoint

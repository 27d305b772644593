"""The application layer: one module per job, each a frozen config (`TrainRun`, ...) and `run(config)`,
which validates everything, then writes a run folder (`record.RunDir`) and returns its summary.

    train       advtune train       a model (zoo name or file.py:factory) trained on a dataset
    finetune    advtune finetune    adversarial fine-tuning of a run: all, a selection, a random control
    analyze     advtune analyze     the vulnerability scores and concentration curve of a run
    evaluate    advtune evaluate    the robustness record of a run (eval-<name>.json)
    harden      advtune harden      analyze -> select -> fine-tune -> evaluate, with the measured recipe
    experiment  advtune experiment  a YAML list of variants side by side, resumable
    demo        advtune demo        the main job at demo sizes
    configs     every job's settings (the flags), importable without torch

The library underneath (data, models, attacks, train, evaluation, vulnerability) never imports this
package; the CLI (`advtune.cli`) only builds the configs and prints what `run` returns.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# loaded on first use: `configs` (every job's settings, no torch) stays light for the CLI's help
_EXPORTS = {"RunDir": "record", "format_info": "info", "open_run": "record", "run_info": "info"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

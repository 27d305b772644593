"""The words of `advtune --help` and of each `advtune <command> --help`'s opening paragraph (cli.py builds the
parsers; a new command adds its line to both dicts)."""

# one line per command: `advtune --help` lists them without building (or importing) the rest
HELP = {
    "train": "train a model (standard or adversarial) into a run folder",
    "evaluate": "clean and robust accuracy of a run under attacks, with the gradient-masking gate",
    "analyze": "vulnerability map of a trained run: per-component scores, per-layer summary, concentration curve",
    "finetune": "adversarially fine-tune a trained run: selected components, all, or a random control",
    "experiment": "run a YAML experiment: variants side by side, resumable",
    "report": "HTML + Markdown report of run folders (experiment, harden, train, finetune, analyze)",
    "info": "show what a run recorded",
    "harden": "make a trained run robust: analysis, selection, selective adversarial fine-tuning, "
    "strong evaluation and report in one command",
    "apply": "apply a robustness patch (patch.safetensors of a harden or finetune run) to its base model",
    "export": "write a run's model for serving: ONNX (checked against PyTorch), safetensors or pt",
    "demo": "the main job end to end on MNIST",
}

# the paragraph atop `advtune <command> --help`
DESCRIPTION = {
    "train": "Train a model by name (or your own, file.py:factory) on a dataset. Writes model.safetensors, "
    "model.json, config.json, metrics.jsonl, cost.json, summary.json to --out.",
    "evaluate": "Evaluate RUN on its test split. Writes RUN/eval-<name>.json (and .png with --plot). "
    "Attacks: {attacks} (spec: name:key=value,...; docs/attacks.md).",
    "analyze": "Score every conv channel / linear unit of BASE under an attack on training data, "
    "write scores (JSON, CSV), per-layer summaries, the concentration curve and plots to --out. "
    "Criteria: {criteria}.",
    "finetune": "Adversarial fine-tuning of BASE (a run folder) through the one training loop, on the base "
    "run's dataset. --select: all (full-network), random (control), layers:<a,b>, lowrank (adapters on every "
    "layer), or an `advtune analyze` folder (top --share of its --criterion ranking, or --params with a "
    "--granularity).",
    "experiment": "Run every variant of CONFIG not yet finished under --out, evaluate each with the "
    "experiment's protocol, and write results.json / results.csv. Re-running skips finished "
    "variants and resumes an interrupted one.",
    "report": "Write <folder>/report.html (self-contained, plots embedded) and report.md from each folder's "
    "records: the full report of an experiment or a harden run, or a run's record with its plots.",
    "info": "Config, seed, versions, metrics, cost and evaluations of a run.",
    "harden": "The method with the best measured recipe as its default (docs/RESULTS.md): rank the components of "
    "BASE by how much the attack exploits them, adversarially fine-tune only a parameter budget shared out by those "
    "scores (the weight entries a short whole-network probe moved most in each layer, and the output layer whole), "
    "evaluate before/after with the strong protocol and the gradient-masking gate, and write a report to --out.",
    "apply": "Rebuild the hardened model from BASE (a run folder or a weights file) and PATCH (a harden or "
    "finetune run's patch.safetensors: only what changed). A base whose hash is not the patch's is refused; "
    "the result is checked bit for bit. Writes the patched weights to --out; from a run folder BASE, a model "
    "folder evaluate, info and export work on.",
    "export": "Write RUN's model to --out: safetensors or pt (exactly the state_dict of the model's own module, "
    "for its strict load_state_dict, no advtune needed) or onnx (the onnx extra; the file is run with "
    "onnxruntime on the test images, clean and under the run's attack, and compared with PyTorch before it "
    "is written; the check goes to FILE.check.json). The model takes pixels in [0, 1].",
    "demo": "Train, attack, analyse, fine-tune, report.",
}


# (command, a flag another command has): this command's flag for the same thing
OTHER_NAME = {
    ("harden", "--attacks"): "--evaluation",
    ("harden", "--suite"): "--evaluation",
    ("evaluate", "--evaluation"): "--attacks (or --suite)",
    ("train", "--attack"): "--adversarial",
    ("finetune", "--adversarial"): "--attack",
    ("harden", "--adversarial"): "--attack",
    ("harden", "--val"): "--holdout",
    ("finetune", "--holdout"): "--val",
}

# what to do after running out of memory, by command (None: the others)
OUT_OF_MEMORY_FIX = {
    "experiment": "set a smaller batch_size in the experiment's YAML and rerun the same command (finished variants "
    "are kept)",
    "demo": "the demo's sizes are fixed: run it where more memory is free",
    "evaluate": "rerun with a smaller --batch-size",
    None: "rerun with a smaller --batch-size, and --overwrite to replace the run folder it began",
}

"""The one list of the files a run folder holds (what each is: docs/usage.md, "Run folders").

Every module that reads or writes a run's files takes the names from here; nothing else spells them.
"""

# every run
CONFIG = "config.json"  # how the run started: resolved config, seed, versions (+ resume stamps)
METRICS = "metrics.jsonl"  # one line per epoch
COST = "cost.json"  # gradient evaluations, FLOPs, wall time, memory
SUMMARY = "summary.json"  # what the job found; written last, so a run with it is finished
LOCK = ".lock"  # the writer's pid while a job writes the folder

# a model
WEIGHTS = "model.safetensors"  # tensors only: loading never executes code
MODEL_META = "model.json"  # what rebuilds the model: architecture or factory, input shape, classes
CHECKPOINT = "checkpoint.pt"  # exact resume: weights, optimizer, RNG, step (weights-only loading)
SELECTION = "selection.json"  # the components a selective fine-tuning trained
SNAPSHOTS = "snapshots"  # snapshots/step-NNNNNNN/: loadable models along a run
PATCH = "patch.safetensors"  # what fine-tuning changed, against the base model's hash (advtune apply)

# analysis, evaluation, experiments, reports
CONCENTRATION = "concentration.json"
ANALYSIS = "analysis"  # harden's analysis subfolder
FINETUNE = "finetune"  # harden's fine-tuning stage
PROBE = "probe"  # harden's probe stage (`advtune finetune` keeps it next to its --out)
HARDEN_STAGES = (ANALYSIS, FINETUNE, PROBE)  # a harden run's own sub-runs
EXPERIMENT = "experiment.json"
RESULTS = "results.json"
RESULTS_CSV = "results.csv"
FRONTIER = "frontier.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def scores(criterion: str, ext: str = "json") -> str:
    """Per-component scores of one criterion (`scores-taylor.json` / `.csv`)."""
    return f"scores-{criterion}.{ext}"


def layer_scores(criterion: str) -> str:
    """Per-layer summary of one criterion (`layers-taylor.json`)."""
    return f"layers-{criterion}.json"


def evaluation(name: str) -> str:
    """An evaluation record (`eval-<name>.json`)."""
    return f"eval-{name}.json"


def snapshot(step: int) -> str:
    """The folder of the snapshot taken after `step` optimizer steps."""
    return f"step-{step:07d}"

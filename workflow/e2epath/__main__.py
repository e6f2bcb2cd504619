"""`python -m e2epath <step> ...` — one sub-command per rule, and the user's tools (`check` a
config, print the resolved `methods` and the `encoders`, `import` a public cohort's sheet and labels).

Each step lives in one module as `cli(argv) -> int`; modules are imported lazily so a step
that reads a TSV does not pay for importing torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

# Large CPU tensors on transparent huge pages (fewer page faults; bench/loader.py); torch reads it
# once, at its first allocation, so it is set before any step imports torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

STEPS: dict[str, str] = {
    "demo": "e2epath.sources.demo.cohort:cli",
    "check": "e2epath.config.cli:check",
    "qc": "e2epath.preprocess.qc:cli",
    "qc_shard": "e2epath.preprocess.qc:cli_shard",
    "qc_table": "e2epath.preprocess.qc:cli_table",
    "tissue": "e2epath.preprocess.tissue:cli",
    "tissue_shard": "e2epath.preprocess.tissue:cli_shard",
    "patch": "e2epath.preprocess.patching:cli",
    "patch_shard": "e2epath.preprocess.patching:cli_shard",
    "manifest": "e2epath.preprocess.patching:cli_manifest",
    "encoder_weights": "e2epath.models.weights:cli_weights",
    "encoders": "e2epath.models.presets:cli",
    "methods": "e2epath.config.cli:methods",
    "import": "e2epath.sources.importers:cli",
    "splits": "e2epath.data.splits:cli",
    "train_e2e": "e2epath.train.e2e:cli",
    "extract_features": "e2epath.features.extraction:cli",
    "extract_features_shard": "e2epath.features.extraction:cli_shard",
    "train_twostage": "e2epath.train.twostage:cli",
    "evaluate": "e2epath.evaluate.evaluation:cli",
    "tables": "e2epath.evaluate.tables:cli",
    "figures_task": "e2epath.figures:cli_task",
    "figures_qc": "e2epath.figures:cli_qc",
    "predict_cohort": "e2epath.deploy.cohort:cli",
    "slide_maps": "e2epath.figures.maps:cli",
    "predict": "e2epath.deploy.predict:cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STEPS:
        print(f"usage: python -m e2epath <step> [args]; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, func = STEPS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

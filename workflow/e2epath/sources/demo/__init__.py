"""The built-in synthetic demo: a small cohort of H&E-like pyramidal slides in real formats whose
label is learnable from a small signal, with its sheet, labels and ground truth — and a second, small
*external* cohort from "another scanner" (``python -m e2epath demo --external``) to demonstrate
external validation: train on the demo cohort, test on this one, as TCGA → CPTAC.

One module a job: ``scanners`` (stain colours, pyramid layouts, JPEG quality), ``design`` (the plan
of a cohort: slides, cases, classes, sheet and labels; no pixels), ``paint`` (a slide's pixels and
its ground truth), ``cohort`` (writing a cohort to disk; the command line). Everything follows from
``seed``. The public names are re-exported here.
"""
from __future__ import annotations

from e2epath.sources.demo.cohort import OWN_ENTRIES, cli, write, write_external, write_slide
from e2epath.sources.demo.design import (
    CLASSES,
    PEN_COLOURS,
    SLIDE_UM,
    SlideSpec,
    design,
    design_external,
    plan,
    plan_external,
    sheet,
    subtype_labels,
    survival_labels,
)
from e2epath.sources.demo.paint import (
    CANVAS_MPP,
    MASK_MPP,
    SIGNAL_BUDGET,
    TRUTH_MPP,
    RenderedSlide,
    render_slide,
    truth_mask,
)
from e2epath.sources.demo.scanners import (
    BACKGROUND,
    DEMO_SCANNER,
    DEMO_STAIN,
    EOSIN,
    EXTERNAL_SCANNER,
    EXTERNAL_STAIN,
    HEMATOXYLIN,
    SCANNERS,
    TUMOUR_CYTOPLASM,
    TUMOUR_NUCLEI,
    Scanner,
    Stain,
)

__all__ = [
    "BACKGROUND", "CANVAS_MPP", "CLASSES", "DEMO_SCANNER", "DEMO_STAIN", "EOSIN", "EXTERNAL_SCANNER", "EXTERNAL_STAIN",
    "HEMATOXYLIN", "MASK_MPP", "OWN_ENTRIES", "PEN_COLOURS", "SCANNERS", "SIGNAL_BUDGET", "SLIDE_UM",
    "TRUTH_MPP", "TUMOUR_CYTOPLASM", "TUMOUR_NUCLEI", "RenderedSlide", "Scanner", "SlideSpec", "Stain", "cli",
    "design", "design_external", "plan", "plan_external", "render_slide", "sheet", "subtype_labels",
    "survival_labels", "truth_mask", "write", "write_external", "write_slide",
]

# e2epath: raw whole-slide images -> tissue masks -> multi-scale LMDB patch stores -> end-to-end
# ResNet + ABMILX and two-stage baselines -> bootstrapped metrics, tables, figures, report.
#
#   snakemake --cores 8 --resources gpu=1 all          # workstation, one GPU
#   snakemake --profile profiles/slurm all             # SLURM cluster
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/deploy.smk"


rule all:
    input:
        all_outputs(),
    default_target: True

# Figures per task (ROC / KM, forest plot, training curves, attention heatmaps), the QC figures of
# each cohort, and slide-level attention maps.


rule figures_task:
    input:
        metrics=layout.METRICS,
        runs=task_runs,  # predictions, history, attention: in each run's folder
        slides=layout.QC_TABLE,
    output:
        out_dir=report(
            directory(layout.TASK_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figures_task.rst",
            category="Figures",
            subcategory="{task}",
        ),
    params:
        step="figures_task",
        task="{task}",
        task_type=task_type,
        alpha=config["evaluate"]["alpha"],
        seed=config["seed"],
    log:
        layout.log("figures/{task}"),
    benchmark:
        layout.benchmark("figures/{task}")
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=20,
    script:
        "../scripts/step.py"


rule figures_qc:
    input:
        slides=layout.QC_TABLE,
        manifest=layout.MANIFEST,
        thumbs=thumbs,  # per slide, or with shards the tissue tables that list them
    output:
        out_dir=report(
            directory(layout.QC_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figures_qc.rst",
            category="Slide QC",
        ),
    params:
        step="figures_qc",
    log:
        layout.log("figures/qc"),
    benchmark:
        layout.benchmark("figures/qc")
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=20,
    script:
        "../scripts/step.py"


use rule figures_qc as cohort_figures_qc with:
    input:
        slides=layout.in_cohort(layout.QC_TABLE),
        manifest=layout.in_cohort(layout.MANIFEST),
        thumbs=thumbs,
    output:
        out_dir=report(
            directory(layout.in_cohort(layout.QC_FIGURES)),
            patterns=["{name}.png"],
            caption="../report/figures_qc_external.rst",
            category="External cohorts",
            subcategory="{cohort}",
        ),
    log:
        layout.log("figures/qc", "{cohort}"),
    benchmark:
        layout.benchmark("figures/qc", "{cohort}")


# Slide-level attention maps of every test slide of a method (PNG overlay, top/bottom patch montage,
# QuPath GeoJSON; e2epath.figures.maps), each slide from the fold that tested it; of an external
# cohort's slides, the mean over the fold models.
rule maps:
    input:
        attention=method_attention,
        slides=layout.QC_TABLE,
        rows=method_rows,  # the stores (after the contours)
    output:
        out_dir=directory(layout.MAPS),
    params:
        step="slide_maps",
        contours_dir=of_cohort(layout.folder(layout.TISSUE_CONTOURS)),
        map_mpp=config["maps"]["mpp"],
        top_k=config["maps"]["top_k"],
    log:
        layout.log("maps/{task}/{method}"),
    benchmark:
        layout.benchmark("maps/{task}/{method}")
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=60,
    script:
        "../scripts/step.py"


use rule maps as cohort_maps with:
    input:
        attention=method_attention,
        slides=layout.in_cohort(layout.QC_TABLE),
        rows=method_rows,
    output:
        out_dir=directory(layout.in_cohort(layout.MAPS)),
    log:
        layout.log("maps/{task}/{method}", "{cohort}"),
    benchmark:
        layout.benchmark("maps/{task}/{method}", "{cohort}")

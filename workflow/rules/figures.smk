# Figures per task (ROC / KM, forest plot, training curves, attention heatmaps) and for the cohort.


rule figures_task:
    input:
        metrics=layout.METRICS,
        runs=lambda w: run_files(w.task, "run"),  # predictions, history, attention: in each run's folder
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
        task_type=lambda w: TASKS[w.task]["type"],
        seed=config["seed"],
    log:
        "results/logs/figures/{task}.log",
    benchmark:
        "results/benchmarks/figures/{task}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=20,
    script:
        "../scripts/step.py"


rule figures_cohort:
    input:
        slides=layout.QC_TABLE,
        manifest=layout.MANIFEST,
        thumbs=thumbs(),
        tissue=tissue_tables(),
    output:
        out_dir=report(
            directory(layout.COHORT_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figures_cohort.rst",
            category="Cohort",
        ),
    params:
        step="figures_cohort",
    log:
        "results/logs/figures/cohort.log",
    benchmark:
        "results/benchmarks/figures/cohort.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=20,
    script:
        "../scripts/step.py"


# Slide-level attention maps of every test slide of a method (PNG overlay, top/bottom patch montage,
# QuPath GeoJSON; e2epath.figures.maps), each slide from the fold that tested it.
rule maps:
    input:
        attention=lambda w: [layout.run_file("attention", FAMILY[w.method], w.task, w.method, k) for k in folds()],
        slides=layout.QC_TABLE,
        rows=lambda w: patch_rows([method_spec(w)["eval_magnification"]]),  # the stores (after the contours)
    output:
        out_dir=directory(layout.MAPS),
    params:
        step="slide_maps",
        contours_dir=layout.folder(layout.TISSUE_CONTOURS),
        map_mpp=config["maps"]["mpp"],
        top_k=config["maps"]["top_k"],
    log:
        "results/logs/maps/{task}/{method}.log",
    benchmark:
        "results/benchmarks/maps/{task}/{method}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=60,
    script:
        "../scripts/step.py"

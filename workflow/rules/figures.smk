# Figures per task (ROC / KM, forest plot, training curves, attention heatmaps) and for the cohort.


rule figures_task:
    input:
        metrics="results/metrics/{task}.tsv",
        predictions=lambda w: predictions(w.task),
        histories=lambda w: [p.replace("predictions.tsv", "history.tsv") for p in predictions(w.task)],
        attention=lambda w: [p.replace("predictions.tsv", "attention.npz") for p in predictions(w.task)],
        slides="results/slides.tsv",
    output:
        out_dir=report(
            directory("results/figures/{task}"),
            patterns=["{name}.png"],
            caption="../report/figures_task.rst",
            category="Figures",
            subcategory="{task}",
        ),
    params:
        step="figures_task",
        task="{task}",
        task_type=lambda w: TASKS[w.task]["type"],
        qc_dir=lambda w, input: str(Path(input.slides).with_suffix("")),  # results/slides/
        seed=config["seed"],
    log:
        "results/logs/figures/{task}.log",
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    script:
        "../scripts/step.py"


rule figures_cohort:
    input:
        slides="results/slides.tsv",
        manifest="results/patches/manifest.tsv",
        thumbs=thumbs(),
        tissue=tissue_tables(),
    output:
        out_dir=report(
            directory("results/figures/cohort"),
            patterns=["{name}.png"],
            caption="../report/figures_cohort.rst",
            category="Cohort",
        ),
    params:
        step="figures_cohort",
    log:
        "results/logs/figures/cohort.log",
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    script:
        "../scripts/step.py"

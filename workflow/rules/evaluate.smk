# 1000x bootstrapped metrics per method and fold (and pooled), paired comparisons, tables.


rule evaluate:
    input:
        runs=lambda w: run_files(w.task, "run"),  # each run says its family, method and fold
        cohorts=lambda w: cohort_predictions(w.task),  # labelled external cohorts' predictions
    output:
        out=layout.METRICS,
        paired_out=layout.PAIRED,
    params:
        step="evaluate",
        task="{task}",
        task_type=lambda w: TASKS[w.task]["type"],
        n_boot=config["evaluate"]["n_boot"],
        seed=config["seed"],
        reference=config["evaluate"]["reference"],
    log:
        "results/logs/evaluate/{task}.log",
    benchmark:
        "results/benchmarks/evaluate/{task}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=30,
    script:
        "../scripts/step.py"


rule tables:
    input:
        metrics=layout.METRICS,
        runs=lambda w: run_files(w.task, "run"),  # which encoder weights each method used
    output:
        md_out=report(layout.TABLE_MD, caption="../report/table.rst", category="Tables"),
        tex_out=layout.TABLE_TEX,
    params:
        step="tables",
    log:
        "results/logs/tables/{task}.log",
    benchmark:
        "results/benchmarks/tables/{task}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=5,
    script:
        "../scripts/step.py"

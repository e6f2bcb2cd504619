# 1000x bootstrapped metrics per method and fold (and pooled), external cohorts' ensembles and fold
# models, paired comparisons, tables.


rule evaluate:
    input:
        runs=task_runs,  # each run says its family, method and fold
        cohorts=cohort_predictions,  # labelled external cohorts' predictions
    output:
        out=layout.METRICS,
        paired_out=layout.PAIRED,
    params:
        step="evaluate",
        task="{task}",
        task_type=task_type,
        n_boot=config["evaluate"]["n_boot"],
        alpha=config["evaluate"]["alpha"],
        seed=config["seed"],
        reference=config["evaluate"]["reference"],
    log:
        layout.log("evaluate/{task}"),
    benchmark:
        layout.benchmark("evaluate/{task}")
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
        runs=task_runs,  # which encoder weights each method used
    output:
        md_out=report(layout.TABLE_MD, caption="../report/table.rst", category="Tables"),
        tex_out=layout.TABLE_TEX,
    params:
        step="tables",
    log:
        layout.log("tables/{task}"),
    benchmark:
        layout.benchmark("tables/{task}")
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=5,
    script:
        "../scripts/step.py"

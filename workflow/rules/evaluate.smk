# 1000x bootstrapped metrics per method and fold (and pooled), paired comparisons, tables.


rule evaluate:
    input:
        positional=lambda w: predictions(w.task),
    output:
        out="results/metrics/{task}.tsv",
        paired_out="results/metrics/{task}_paired.tsv",
    params:
        step="evaluate",
        task="{task}",
        task_type=lambda w: TASKS[w.task]["type"],
        n_boot=config["evaluate"]["n_boot"],
        seed=config["seed"],
        reference=config["evaluate"]["reference"],
    log:
        "results/logs/evaluate/{task}.log",
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/step.py"


rule tables:
    input:
        metrics="results/metrics/{task}.tsv",
    output:
        md_out=report("results/tables/{task}.md", caption="../report/table.rst", category="Tables"),
        tex_out="results/tables/{task}.tex",
    params:
        step="tables",
    log:
        "results/logs/tables/{task}.log",
    conda:
        "../../envs/evaluate.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/step.py"

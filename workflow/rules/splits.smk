# Patient-level train / val / test folds per task, seeded from the config.


rule splits:
    input:
        labels=lambda w: TASKS[w.task]["labels"],
        slides=layout.QC_TABLE,
    output:
        out=layout.SPLITS,
    params:
        step="splits",
        task="{task}",
        task_type=lambda w: TASKS[w.task]["type"],
        mode=config["splits"]["mode"],
        k=config["splits"]["k"],
        val_fraction=config["splits"]["val_fraction"],
        holdout=config["splits"]["holdout"],
        seed=config["seed"],
    log:
        "results/logs/splits/{task}.log",
    benchmark:
        "results/benchmarks/splits/{task}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=5,
    script:
        "../scripts/step.py"

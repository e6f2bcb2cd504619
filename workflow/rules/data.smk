# Patient-level train / val / test folds per task, seeded from the config.


rule splits:
    input:
        labels=task_labels,
        slides=layout.QC_TABLE,
    output:
        out=layout.SPLITS,
    params:
        step="splits",
        task="{task}",
        task_type=task_type,
        mode=config["splits"]["mode"],
        k=config["splits"]["k"],
        val_fraction=config["splits"]["val_fraction"],
        holdout=config["splits"]["holdout"],
        seed=config["seed"],
    log:
        layout.log("splits/{task}"),
    benchmark:
        layout.benchmark("splits/{task}")
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=5,
    script:
        "../scripts/step.py"

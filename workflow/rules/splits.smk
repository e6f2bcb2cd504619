# Patient-level train / val / test folds per task, seeded from the config.


rule splits:
    input:
        labels=lambda w: TASKS[w.task]["labels"],
        slides="results/slides.tsv",
    output:
        out="results/splits/{task}.tsv",
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
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/step.py"

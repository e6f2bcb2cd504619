# End-to-end training: ResNet + MIL aggregator on multi-scale random instance samples.
# One GPU job per task x method x fold; model selection on the validation subset only.


rule train_e2e:
    input:
        splits="results/splits/{task}.tsv",
        labels=lambda w: TASKS[w.task]["labels"],
        slides="results/slides.tsv",
        rows=method_rows,
    output:
        model="results/e2e/{task}/{method}/fold{fold}/model.pt",
        history="results/e2e/{task}/{method}/fold{fold}/history.tsv",
        predictions="results/e2e/{task}/{method}/fold{fold}/predictions.tsv",
        attention="results/e2e/{task}/{method}/fold{fold}/attention.npz",
    params:
        step="train_e2e",
        fold="{fold}",
        spec=method_json,
        seed=config["seed"],
    log:
        "results/logs/train_e2e/{task}/{method}/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_e2e/{task}/{method}/fold{fold}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: lambda w: 1 + method_spec(w)["workers"]
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"

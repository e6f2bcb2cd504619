# End-to-end training: ResNet + MIL aggregator on multi-scale random instance samples.
# One GPU job per task x method x fold; model selection on the validation subset only.


rule train_e2e:
    input:
        splits=layout.SPLITS,
        labels=lambda w: TASKS[w.task]["labels"],
        slides=layout.QC_TABLE,
        rows=method_rows,
        pretrained=method_weights,  # the imagenet_weights record, or the weights file
    output:
        model=layout.run_file("model", family="e2e"),
        history=layout.run_file("history", family="e2e"),
        predictions=layout.run_file("predictions", family="e2e"),
        attention=layout.run_file("attention", family="e2e"),
        run=layout.run_file("run", family="e2e"),
    params:
        step="train_e2e",
        task="{task}",
        fold="{fold}",
        spec=method_json,
        seed=config["seed"],
        preprocess=PREPROCESS_JSON,  # recorded in the model file: new slides are prepared the same way
    log:
        "results/logs/train_e2e/{task}/{method}/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_e2e/{task}/{method}/fold{fold}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: lambda w: 1 + method_spec(w)["workers"]
    resources:
        mem_mb=per_attempt(16000),
        runtime=24 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"

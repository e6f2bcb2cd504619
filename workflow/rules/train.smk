# Training jobs, one per task x method x fold (GPU): end to end (ResNet + MIL aggregator on
# multi-scale random instance samples) and two-stage (an aggregator on frozen features of full bags,
# workflow/rules/features.smk); both through one job skeleton (e2epath.train.job). Model selection
# on the validation subset only.


rule train_e2e:
    input:
        splits=layout.SPLITS,
        labels=task_labels,
        slides=layout.QC_TABLE,
        inputs=method_inputs,  # E2E: manifest rows of the magnifications it reads; two-stage: features
        pretrained=method_weights,  # E2E: the encoder_weights record, or the weights file
    output:
        **layout.run_outputs("e2e"),
    params:
        step="train_e2e",
        task="{task}",
        fold="{fold}",
        spec=method_json,
        seed=config["seed"],
        preprocess=PREPROCESS_JSON,  # recorded in the model file: new slides are prepared the same way
    log:
        layout.log("train_e2e/{task}/{method}/fold{fold}"),
    benchmark:
        layout.benchmark("train_e2e/{task}/{method}/fold{fold}")
    conda:
        "../../envs/train.yaml"
    threads: training_threads
    resources:
        mem_mb=training_mb,
        runtime=training_minutes,
        gpu=GPU,
    script:
        "../scripts/step.py"


use rule train_e2e as train_twostage with:
    output:
        **layout.run_outputs("twostage"),
    params:
        step="train_twostage",
    log:
        layout.log("train_twostage/{task}/{method}/fold{fold}"),
    benchmark:
        layout.benchmark("train_twostage/{task}/{method}/fold{fold}")

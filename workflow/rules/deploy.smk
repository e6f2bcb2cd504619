# Trained models on external cohorts (config `cohorts:`; each prepared by the training cohort's
# rules into results/cohorts/{cohort}/): every fold model of every method predicts every bag of the
# cohort, with their ensemble; labelled tasks are scored by `evaluate` next to the internal test folds.


# One GPU job per cohort x task x method.
rule predict_cohort:
    input:
        models=method_models,
        slides=layout.in_cohort(layout.QC_TABLE),
        inputs=method_inputs,  # E2E: patch rows at the evaluation magnification; two-stage: features
        labels=labels_of_cohort,
    output:
        predictions=expand(layout.cohort_file("predictions"), fold=PLAN.folds, allow_missing=True),
        attention=expand(layout.cohort_file("attention"), fold=PLAN.folds, allow_missing=True),
        ensemble=layout.cohort_file("ensemble"),
        record=layout.cohort_file("record"),
    params:
        step="predict_cohort",
        task="{task}",
        cohort="{cohort}",
    log:
        layout.log("predict/{task}/{method}", "{cohort}"),
    benchmark:
        layout.benchmark("predict/{task}/{method}", "{cohort}")
    conda:
        "../../envs/train.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=per_attempt(16000),
        runtime=6 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"


rule predict:
    input:
        predict_outputs(),

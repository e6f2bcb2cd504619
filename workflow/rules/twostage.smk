# Two-stage baseline: frozen-encoder features per slide and encoder (twostage.encoders), then MIL
# on full bags, same splits.

TS = config["twostage"]


# Per-slide jobs: the training cohort's without preprocess.shards, and always an external cohort's
# (`use rule ... as cohort_*`, workflow/rules/external.smk).
rule extract_features:
    input:
        rows=lambda w: expand(layout.PATCH_ROW, mag=fallback_mags(w), slide=w.slide),
        pretrained=feature_pretrained,  # the encoder_weights record, or the weights file
    output:
        out=layout.FEATURES,
    params:
        step="extract_features",
        encoder=feature_encoder_json,  # the preset as JSON (changes rerun only its features)
        magnification="{mag}",
        weights=feature_weights,  # imagenet, hf:..., a file, or "None" (random init): e2epath.models.build_encoder
        batch_size=TS["batch_size"],
        seed=config["seed"],
        workers=lambda w, threads: threads,  # JPEG decoding overlaps the encoder
    log:
        "results/logs/extract_features/{encoder}/{mag}x/{slide}.log",
    benchmark:
        "results/benchmarks/extract_features/{encoder}/{mag}x/{slide}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=feature_memory,
        runtime=MINUTES_PER_SLIDE["extract_features"],
        gpu=GPU,
    script:
        "../scripts/step.py"


if SHARDS:

    rule extract_features_shard:
        input:
            rows=lambda w: expand(layout.SHARD_TABLES["patch"], mag=fallback_mags(w), shard=w.shard),
            pretrained=feature_pretrained,  # the encoder_weights record, or the weights file
        output:
            out=layout.SHARD_TABLES["features"],
        params:
            step="extract_features_shard",
            encoder=feature_encoder_json,  # the preset as JSON (changes rerun only its features)
            magnification="{mag}",
            weights=feature_weights,
            batch_size=TS["batch_size"],
            seed=config["seed"],
            workers=lambda w, threads: threads,
            feature_dir=layout.folder(layout.FEATURES),
            done_dir=layout.SHARD_MARKERS["features"],
        log:
            "results/logs/shards/extract_features/{encoder}/{mag}x/{shard}.log",
        benchmark:
            "results/benchmarks/shards/extract_features/{encoder}/{mag}x/{shard}.tsv"
        conda:
            "../../envs/train.yaml"
        threads: SLIDE_THREADS
        resources:
            mem_mb=feature_memory,
            runtime=shard_runtime("extract_features"),
            gpu=GPU,
        script:
            "../scripts/step.py"


rule train_mil:
    input:
        splits=layout.SPLITS,
        labels=lambda w: TASKS[w.task]["labels"],
        slides=layout.QC_TABLE,
        features=method_features,
    output:
        model=layout.run_file("model", family="twostage"),
        history=layout.run_file("history", family="twostage"),
        predictions=layout.run_file("predictions", family="twostage"),
        attention=layout.run_file("attention", family="twostage"),
        run=layout.run_file("run", family="twostage"),
    params:
        step="train_mil",
        task="{task}",
        fold="{fold}",
        spec=method_json,
        seed=config["seed"],
        preprocess=PREPROCESS_JSON,  # recorded in the model file: new slides are prepared the same way
    log:
        "results/logs/train_mil/{task}/{method}/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_mil/{task}/{method}/fold{fold}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=per_attempt(8000),
        runtime=6 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"

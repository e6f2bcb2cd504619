# Frozen-encoder features of every slide of a cohort, per encoder of twostage.encoders (GPU), for
# the two-stage baseline (workflow/rules/train.smk): one job per slide, or per shard of slides.


rule extract_features:
    input:
        rows=fallback_rows,  # the feature magnification and the coarser ones it may fall back to
        pretrained=feature_pretrained,  # the encoder_weights record, or the weights file
    output:
        out=layout.FEATURES,
    params:
        step="extract_features",
        encoder=feature_encoder_json,  # the preset as JSON (changes rerun only its features)
        magnification="{mag}",
        weights=feature_weights,  # imagenet, hf:..., a file; left out: random initialisation
        batch_size=config["twostage"]["batch_size"],
        seed=config["seed"],
        workers=job_threads,  # JPEG decoding overlaps the encoder
    log:
        layout.log("extract_features/{encoder}/{mag}x/{slide}"),
    benchmark:
        layout.benchmark("extract_features/{encoder}/{mag}x/{slide}")
    conda:
        "../../envs/train.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=feature_mb,
        runtime=slide_minutes("extract_features"),
        gpu=GPU,
    script:
        "../scripts/step.py"


if SHARDED:

    use rule extract_features as extract_features_shard with:
        output:
            out=layout.SHARD_TABLES["features"],
        params:
            step="extract_features_shard",
            feature_dir=of_cohort(layout.folder(layout.FEATURES)),
            done_dir=of_cohort(layout.SHARD_MARKERS["features"]),
        log:
            layout.log("shards/extract_features/{encoder}/{mag}x/{shard}"),
        benchmark:
            layout.benchmark("shards/extract_features/{encoder}/{mag}x/{shard}")


use rule extract_features as cohort_extract_features with:
    output:
        out=layout.in_cohort(layout.FEATURES),
    log:
        layout.log("extract_features/{encoder}/{mag}x/{slide}", "{cohort}"),
    benchmark:
        layout.benchmark("extract_features/{encoder}/{mag}x/{slide}", "{cohort}")


if SHARDED:

    use rule extract_features_shard as cohort_extract_features_shard with:
        output:
            out=layout.in_cohort(layout.SHARD_TABLES["features"]),
        log:
            layout.log("shards/extract_features/{encoder}/{mag}x/{shard}", "{cohort}"),
        benchmark:
            layout.benchmark("shards/extract_features/{encoder}/{mag}x/{shard}", "{cohort}")

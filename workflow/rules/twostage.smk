# Two-stage baseline: frozen-encoder features per slide, then MIL on full bags, same splits.

TS = config["twostage"]
TS_FEATURES = per_unit("results/features/{encoder}/{mag}x/{slide}.pt",
                       "results/shards/features/{encoder}/{mag}x/{shard}.json",
                       encoder=TS["encoder"], mag=TS["magnification"])


if not SHARDS:

    rule extract_features:
        input:
            rows=lambda w: expand("results/patches/{mag}x/{slide}.json", mag=fallback_mags(w), slide=w.slide),
        output:
            out="results/features/{encoder}/{mag}x/{slide}.pt",
        params:
            step="extract_features",
            encoder="{encoder}",
            magnification="{mag}",
            weights=str(TS["weights"]),  # "None" = random init; a missing flag would mean "auto"
            input_size=TS["input_size"],
            batch_size=TS["batch_size"],
            seed=config["seed"],
            workers=lambda w, threads: threads,  # JPEG decoding overlaps the encoder
        log:
            "results/logs/extract_features/{encoder}/{mag}x/{slide}.log",
        benchmark:
            "results/benchmarks/extract_features/{encoder}/{mag}x/{slide}.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=GPU,
        script:
            "../scripts/step.py"


else:

    rule extract_features_shard:
        input:
            rows=lambda w: expand("results/shards/patches/{mag}x/{shard}.json", mag=fallback_mags(w), shard=w.shard),
        output:
            out="results/shards/features/{encoder}/{mag}x/{shard}.json",
        params:
            step="extract_features_shard",
            encoder="{encoder}",
            magnification="{mag}",
            weights=str(TS["weights"]),
            input_size=TS["input_size"],
            batch_size=TS["batch_size"],
            seed=config["seed"],
            workers=lambda w, threads: threads,
            feature_dir="results/features/{encoder}/{mag}x",
            done_dir="results/shards/done/features/{encoder}/{mag}x",
        log:
            "results/logs/shards/extract_features/{encoder}/{mag}x/{shard}.log",
        benchmark:
            "results/benchmarks/shards/extract_features/{encoder}/{mag}x/{shard}.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=shard_runtime(10),
            gpu=GPU,
        script:
            "../scripts/step.py"


rule train_mil:
    input:
        splits="results/splits/{task}.tsv",
        labels=lambda w: TASKS[w.task]["labels"],
        slides="results/slides.tsv",
        features=TS_FEATURES,
    output:
        model="results/twostage/{task}/{method}/fold{fold}/model.pt",
        history="results/twostage/{task}/{method}/fold{fold}/history.tsv",
        predictions="results/twostage/{task}/{method}/fold{fold}/predictions.tsv",
        attention="results/twostage/{task}/{method}/fold{fold}/attention.npz",
    params:
        step="train_mil",
        fold="{fold}",
        spec=method_json,
        seed=config["seed"],
    log:
        "results/logs/train_mil/{task}/{method}/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_mil/{task}/{method}/fold{fold}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=8000,
        runtime=6 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"

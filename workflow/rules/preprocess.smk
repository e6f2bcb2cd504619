# Slide QC -> tissue segmentation -> patching + LMDB packing per slide x magnification -> manifest.
# A bad slide never fails a job: every step writes its outputs with a status and a message.

if DEMO:

    rule demo_cohort:
        output:
            config["samples"],
            list(SAMPLES["path"]),
            expand("{out}/labels/{name}.csv", out=Path(config["samples"]).parent, name=["subtype", "survival"]),
        params:
            step="demo",
            out=lambda w, output: str(Path(output[0]).parent),
            n_slides=config["demo"]["n_slides"],
            seed=config["demo"]["seed"],
            scale=config["demo"]["scale"],
        log:
            "results/logs/demo_cohort.log",
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=4000,
            runtime=30,
        script:
            "../scripts/step.py"


# One job per slide and step (the default), or per shard of slides (preprocess.shards > 0;
# e2epath.shards): the same steps and per-slide files, a far smaller DAG.
if not SHARDS:

    rule slide_qc:
        input:
            path=slide_path,
        output:
            out="results/slides/{slide}.json",
        params:
            step="qc",
            slide_id="{slide}",
            case_id=case_of,
            sheet_mpp=sheet_mpp,
        log:
            "results/logs/slide_qc/{slide}.log",
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=1000,
            runtime=5,
        script:
            "../scripts/step.py"


    rule tissue:
        input:
            qc="results/slides/{slide}.json",
        output:
            mask_out="results/tissue/masks/{slide}.png",
            geojson_out="results/tissue/contours/{slide}.geojson",
            thumb_out="results/tissue/thumbs/{slide}.png",
        params:
            step="tissue",
            preset=config["preprocess"]["tissue"]["preset"],
            seg_mpp=config["preprocess"]["tissue"]["seg_mpp"],
        log:
            "results/logs/tissue/{slide}.log",
        benchmark:
            "results/benchmarks/tissue/{slide}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=4000,
            runtime=15,
        script:
            "../scripts/step.py"


    rule patch:
        input:
            qc="results/slides/{slide}.json",
            mask="results/tissue/masks/{slide}.png",
            geojson="results/tissue/contours/{slide}.geojson",
        output:
            lmdb_out="results/lmdb/{mag}x/{slide}.lmdb",
            row_out="results/patches/{mag}x/{slide}.json",
        params:
            step="patch",
            magnification="{mag}",
            patch_size=config["preprocess"]["patch_size"],
            min_tissue=config["preprocess"]["min_tissue"],
            tolerance=config["preprocess"]["mpp_tolerance"],
            allow_upsample=config["preprocess"]["allow_upsample"],
            jpeg_quality=config["preprocess"]["jpeg_quality"],
        log:
            "results/logs/patch/{mag}x/{slide}.log",
        benchmark:
            "results/benchmarks/patch/{mag}x/{slide}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=4000,
            runtime=60,
        script:
            "../scripts/step.py"


else:

    rule slide_qc_shard:
        input:
            paths=shard_column("path"),
        output:
            out="results/shards/qc/{shard}.json",
        params:
            step="qc_shard",
            slide_ids=lambda w: SHARDS[w.shard],
            case_ids=shard_column("case_id"),
            sheet_mpps=shard_column("mpp", missing="nan"),
            qc_dir="results/slides",
            done_dir="results/shards/done/qc",
        log:
            "results/logs/shards/slide_qc/{shard}.log",
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=1000,
            runtime=shard_runtime(2),
        script:
            "../scripts/step.py"

    rule tissue_shard:
        input:
            qc="results/shards/qc/{shard}.json",
        output:
            out="results/shards/tissue/{shard}.json",
        params:
            step="tissue_shard",
            preset=config["preprocess"]["tissue"]["preset"],
            seg_mpp=config["preprocess"]["tissue"]["seg_mpp"],
            mask_dir="results/tissue/masks",
            geojson_dir="results/tissue/contours",
            thumb_dir="results/tissue/thumbs",
            done_dir="results/shards/done/tissue",
        log:
            "results/logs/shards/tissue/{shard}.log",
        benchmark:
            "results/benchmarks/shards/tissue/{shard}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=4000,
            runtime=shard_runtime(5),
        script:
            "../scripts/step.py"

    rule patch_shard:
        input:
            qc="results/shards/qc/{shard}.json",
            tissue="results/shards/tissue/{shard}.json",
        output:
            out="results/shards/patches/{mag}x/{shard}.json",
        params:
            step="patch_shard",
            magnification="{mag}",
            patch_size=config["preprocess"]["patch_size"],
            min_tissue=config["preprocess"]["min_tissue"],
            tolerance=config["preprocess"]["mpp_tolerance"],
            allow_upsample=config["preprocess"]["allow_upsample"],
            jpeg_quality=config["preprocess"]["jpeg_quality"],
            lmdb_dir="results/lmdb/{mag}x",
            row_dir="results/patches/{mag}x",
            done_dir="results/shards/done/patch/{mag}x",
        log:
            "results/logs/shards/patch/{mag}x/{shard}.log",
        benchmark:
            "results/benchmarks/shards/patch/{mag}x/{shard}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=4000,
            runtime=shard_runtime(15),
        script:
            "../scripts/step.py"


rule qc_table:
    input:
        positional=qc_records(),
    output:
        out="results/slides.tsv",
    params:
        step="qc_table",
    log:
        "results/logs/qc_table.log",
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/step.py"


rule manifest:
    input:
        positional=patch_rows(MAGS),
    output:
        out="results/patches/manifest.tsv",
    params:
        step="manifest",
    log:
        "results/logs/manifest.log",
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/step.py"


rule preprocess:
    input:
        "results/slides.tsv",
        "results/patches/manifest.tsv",
        thumbs(),
        tissue_tables(),

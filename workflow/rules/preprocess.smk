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
        benchmark:
            "results/benchmarks/demo_cohort.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=per_attempt(4000),
            runtime=30,
        script:
            "../scripts/step.py"


# One job per slide and step (the default), or per shard of slides (preprocess.shards > 0;
# e2epath.shards): the same steps and per-slide files, a far smaller DAG. The per-slide rules are
# also the external cohorts' (`use rule ... as cohort_*`: workflow/rules/external.smk).
rule slide_qc:
    input:
        path=slide_path,
    output:
        out=layout.QC_RECORD,
    params:
        step="qc",
        slide_id="{slide}",
        case_id=case_of,
        sheet_mpp=sheet_mpp,
    log:
        "results/logs/slide_qc/{slide}.log",
    benchmark:
        "results/benchmarks/slide_qc/{slide}.tsv"
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=MINUTES_PER_SLIDE["slide_qc"],
    script:
        "../scripts/step.py"

rule tissue:
    input:
        qc=layout.QC_RECORD,
    output:
        mask_out=layout.TISSUE_MASK,
        geojson_out=layout.TISSUE_CONTOURS,
        thumb_out=layout.TISSUE_THUMB,
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
        mem_mb=per_attempt(4000),
        runtime=MINUTES_PER_SLIDE["tissue"],
    script:
        "../scripts/step.py"

rule patch:
    input:
        qc=layout.QC_RECORD,
        mask=layout.TISSUE_MASK,
        geojson=layout.TISSUE_CONTOURS,
    output:
        lmdb_out=layout.PATCH_STORE,
        row_out=layout.PATCH_ROW,
    params:
        step="patch",
        magnification="{mag}",
        patch_size=config["preprocess"]["patch_size"],
        min_tissue=config["preprocess"]["min_tissue"],
        tolerance=config["preprocess"]["mpp_tolerance"],
        allow_upsample=config["preprocess"]["allow_upsample"],
        jpeg_quality=config["preprocess"]["jpeg_quality"],
        threads=lambda w, threads: threads,  # windows decoded in parallel
    log:
        "results/logs/patch/{mag}x/{slide}.log",
    benchmark:
        "results/benchmarks/patch/{mag}x/{slide}.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=per_attempt(4000),
        runtime=MINUTES_PER_SLIDE["patch"],
    script:
        "../scripts/step.py"


if SHARDS:

    rule slide_qc_shard:
        input:
            path=shard_column("path"),
        output:
            out=layout.SHARD_TABLES["qc"],
        params:
            step="qc_shard",
            slide_id=lambda w: SHARDS[w.shard],
            case_id=shard_column("case_id"),
            sheet_mpp=shard_column("mpp", missing="nan"),
            qc_dir=layout.folder(layout.QC_RECORD),
            done_dir=layout.SHARD_MARKERS["qc"],
        log:
            "results/logs/shards/slide_qc/{shard}.log",
        benchmark:
            "results/benchmarks/shards/slide_qc/{shard}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=per_attempt(1000),
            runtime=shard_runtime("slide_qc"),
        script:
            "../scripts/step.py"

    rule tissue_shard:
        input:
            qc=layout.SHARD_TABLES["qc"],
        output:
            out=layout.SHARD_TABLES["tissue"],
        params:
            step="tissue_shard",
            preset=config["preprocess"]["tissue"]["preset"],
            seg_mpp=config["preprocess"]["tissue"]["seg_mpp"],
            mask_dir=layout.folder(layout.TISSUE_MASK),
            geojson_dir=layout.folder(layout.TISSUE_CONTOURS),
            thumb_dir=layout.folder(layout.TISSUE_THUMB),
            done_dir=layout.SHARD_MARKERS["tissue"],
        log:
            "results/logs/shards/tissue/{shard}.log",
        benchmark:
            "results/benchmarks/shards/tissue/{shard}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=per_attempt(4000),
            runtime=shard_runtime("tissue"),
        script:
            "../scripts/step.py"

    rule patch_shard:
        input:
            qc=layout.SHARD_TABLES["qc"],
            tissue=layout.SHARD_TABLES["tissue"],
        output:
            out=layout.SHARD_TABLES["patch"],
        params:
            step="patch_shard",
            magnification="{mag}",
            patch_size=config["preprocess"]["patch_size"],
            min_tissue=config["preprocess"]["min_tissue"],
            tolerance=config["preprocess"]["mpp_tolerance"],
            allow_upsample=config["preprocess"]["allow_upsample"],
            jpeg_quality=config["preprocess"]["jpeg_quality"],
            threads=lambda w, threads: threads,
            lmdb_dir=layout.folder(layout.PATCH_STORE),
            row_dir=layout.folder(layout.PATCH_ROW),
            done_dir=layout.SHARD_MARKERS["patch"],
        log:
            "results/logs/shards/patch/{mag}x/{shard}.log",
        benchmark:
            "results/benchmarks/shards/patch/{mag}x/{shard}.tsv"
        conda:
            "../../envs/preprocess.yaml"
        threads: SLIDE_THREADS
        resources:
            mem_mb=per_attempt(4000),
            runtime=shard_runtime("patch"),
        script:
            "../scripts/step.py"


rule qc_table:
    input:
        positional=qc_records(),
    output:
        out=layout.QC_TABLE,
    params:
        step="qc_table",
    log:
        "results/logs/qc_table.log",
    benchmark:
        "results/benchmarks/qc_table.tsv"
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=10,
    script:
        "../scripts/step.py"


rule manifest:
    input:
        positional=patch_rows(MAGS),
    output:
        out=layout.MANIFEST,
    params:
        step="manifest",
    log:
        "results/logs/manifest.log",
    benchmark:
        "results/benchmarks/manifest.tsv"
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=10,
    script:
        "../scripts/step.py"


rule preprocess:
    input:
        layout.QC_TABLE,
        layout.MANIFEST,
        thumbs(),
        tissue_tables(),

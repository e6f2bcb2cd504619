# Slide QC -> tissue segmentation -> patching + LMDB packing per slide x magnification -> manifest.
# A bad slide never fails a job: every step writes its outputs with a status and a message.
# One job per slide and step (the default), or per shard of slides (preprocess.shards > 0;
# e2epath.preprocess.shards): the same steps and per-slide files, a far smaller DAG. External cohorts
# run the same rules into results/cohorts/{cohort}/ (`cohort_*`, workflow/rules/external.smk).


rule slide_qc:
    input:
        path=sheet_value("path"),
    output:
        out=layout.QC_RECORD,
    params:
        step="qc",
        slide_id="{slide}",
        case_id=sheet_value("case_id"),
        sheet_mpp=sheet_value("mpp"),
    log:
        layout.log("slide_qc/{slide}"),
    benchmark:
        layout.benchmark("slide_qc/{slide}")
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=slide_minutes("slide_qc"),
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
        **config["preprocess"]["tissue"],  # the preset, seg_mpp and the settings the config changes
    log:
        layout.log("tissue/{slide}"),
    benchmark:
        layout.benchmark("tissue/{slide}")
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=slide_minutes("tissue"),
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
        mpp_tolerance=config["preprocess"]["mpp_tolerance"],
        allow_upsample=config["preprocess"]["allow_upsample"],
        jpeg_quality=config["preprocess"]["jpeg_quality"],
        threads=job_threads,  # windows decoded in parallel
    log:
        layout.log("patch/{mag}x/{slide}"),
    benchmark:
        layout.benchmark("patch/{mag}x/{slide}")
    conda:
        "../../envs/preprocess.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=per_attempt(4000),
        runtime=slide_minutes("patch"),
    script:
        "../scripts/step.py"


if SHARDED:

    use rule slide_qc as slide_qc_shard with:
        output:
            out=layout.SHARD_TABLES["qc"],
        params:
            step="qc_shard",
            slide_id=shard_slides,
            sheet_mpp=sheet_value("mpp", missing="nan"),
            qc_dir=of_cohort(layout.folder(layout.QC_RECORD)),
            done_dir=of_cohort(layout.SHARD_MARKERS["qc"]),
        log:
            layout.log("shards/slide_qc/{shard}"),
        benchmark:
            layout.benchmark("shards/slide_qc/{shard}")

    use rule tissue as tissue_shard with:
        input:
            qc=layout.SHARD_TABLES["qc"],
        output:
            out=layout.SHARD_TABLES["tissue"],
        params:
            step="tissue_shard",
            mask_dir=of_cohort(layout.folder(layout.TISSUE_MASK)),
            geojson_dir=of_cohort(layout.folder(layout.TISSUE_CONTOURS)),
            thumb_dir=of_cohort(layout.folder(layout.TISSUE_THUMB)),
            done_dir=of_cohort(layout.SHARD_MARKERS["tissue"]),
        log:
            layout.log("shards/tissue/{shard}"),
        benchmark:
            layout.benchmark("shards/tissue/{shard}")

    use rule patch as patch_shard with:
        input:
            qc=layout.SHARD_TABLES["qc"],
            tissue=layout.SHARD_TABLES["tissue"],
        output:
            out=layout.SHARD_TABLES["patch"],
        params:
            step="patch_shard",
            lmdb_dir=of_cohort(layout.folder(layout.PATCH_STORE)),
            row_dir=of_cohort(layout.folder(layout.PATCH_ROW)),
            done_dir=of_cohort(layout.SHARD_MARKERS["patch"]),
        log:
            layout.log("shards/patch/{mag}x/{shard}"),
        benchmark:
            layout.benchmark("shards/patch/{mag}x/{shard}")


rule qc_table:
    input:
        positional=qc_records,
    output:
        out=layout.QC_TABLE,
    params:
        step="qc_table",
    log:
        layout.log("qc_table"),
    benchmark:
        layout.benchmark("qc_table")
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=10,
    script:
        "../scripts/step.py"


rule manifest:
    input:
        positional=cohort_patch_rows,
    output:
        out=layout.MANIFEST,
    params:
        step="manifest",
    log:
        layout.log("manifest"),
    benchmark:
        layout.benchmark("manifest")
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
        thumbs,


# External cohorts (config `cohorts:`): the same rules and settings into results/cohorts/{cohort}/
# (e2epath.core.layout.in_cohort), so the training cohort's files and reruns are untouched.
use rule slide_qc as cohort_slide_qc with:
    output:
        out=layout.in_cohort(layout.QC_RECORD),
    log:
        layout.log("slide_qc/{slide}", "{cohort}"),
    benchmark:
        layout.benchmark("slide_qc/{slide}", "{cohort}")


use rule tissue as cohort_tissue with:
    input:
        qc=layout.in_cohort(layout.QC_RECORD),
    output:
        mask_out=layout.in_cohort(layout.TISSUE_MASK),
        geojson_out=layout.in_cohort(layout.TISSUE_CONTOURS),
        thumb_out=layout.in_cohort(layout.TISSUE_THUMB),
    log:
        layout.log("tissue/{slide}", "{cohort}"),
    benchmark:
        layout.benchmark("tissue/{slide}", "{cohort}")


use rule patch as cohort_patch with:
    input:
        qc=layout.in_cohort(layout.QC_RECORD),
        mask=layout.in_cohort(layout.TISSUE_MASK),
        geojson=layout.in_cohort(layout.TISSUE_CONTOURS),
    output:
        lmdb_out=layout.in_cohort(layout.PATCH_STORE),
        row_out=layout.in_cohort(layout.PATCH_ROW),
    log:
        layout.log("patch/{mag}x/{slide}", "{cohort}"),
    benchmark:
        layout.benchmark("patch/{mag}x/{slide}", "{cohort}")


if SHARDED:

    use rule slide_qc_shard as cohort_slide_qc_shard with:
        output:
            out=layout.in_cohort(layout.SHARD_TABLES["qc"]),
        log:
            layout.log("shards/slide_qc/{shard}", "{cohort}"),
        benchmark:
            layout.benchmark("shards/slide_qc/{shard}", "{cohort}")

    use rule tissue_shard as cohort_tissue_shard with:
        input:
            qc=layout.in_cohort(layout.SHARD_TABLES["qc"]),
        output:
            out=layout.in_cohort(layout.SHARD_TABLES["tissue"]),
        log:
            layout.log("shards/tissue/{shard}", "{cohort}"),
        benchmark:
            layout.benchmark("shards/tissue/{shard}", "{cohort}")

    use rule patch_shard as cohort_patch_shard with:
        input:
            qc=layout.in_cohort(layout.SHARD_TABLES["qc"]),
            tissue=layout.in_cohort(layout.SHARD_TABLES["tissue"]),
        output:
            out=layout.in_cohort(layout.SHARD_TABLES["patch"]),
        log:
            layout.log("shards/patch/{mag}x/{shard}", "{cohort}"),
        benchmark:
            layout.benchmark("shards/patch/{mag}x/{shard}", "{cohort}")


use rule qc_table as cohort_qc_table with:
    output:
        out=layout.in_cohort(layout.QC_TABLE),
    log:
        layout.log("qc_table", "{cohort}"),
    benchmark:
        layout.benchmark("qc_table", "{cohort}")


use rule manifest as cohort_manifest with:
    output:
        out=layout.in_cohort(layout.MANIFEST),
    log:
        layout.log("manifest", "{cohort}"),
    benchmark:
        layout.benchmark("manifest", "{cohort}")

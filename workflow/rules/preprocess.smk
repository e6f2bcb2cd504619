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


rule qc_table:
    input:
        positional=expand("results/slides/{slide}.json", slide=SLIDES),
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
        expand("results/tissue/thumbs/{slide}.png", slide=SLIDES),

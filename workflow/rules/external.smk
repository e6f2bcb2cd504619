# External cohorts (config `cohorts:`): each is prepared by the training cohort's rules and
# settings into results/cohorts/{cohort}/ (e2epath.layout.in_cohort), so the training cohort's
# files and reruns are untouched; every fold model of every method predicts it (and their
# ensemble); labelled tasks are scored by `evaluate` next to the internal test folds.

# A synthetic external cohort ("another scanner") for the demo, when its sheet is missing.
for _cohort, _demo in DEMO_COHORTS.items():

    rule:
        name:
            f"demo_cohort_{_cohort}"
        output:
            config["cohorts"][_cohort]["samples"],
            list(COHORTS[_cohort]["path"]),
            expand("{out}/labels/{name}.csv", out=Path(config["cohorts"][_cohort]["samples"]).parent,
                   name=["subtype", "survival"]),
        params:
            step="demo",
            external=True,
            out=lambda w, output: str(Path(output[0]).parent),
            n_slides=_demo["n_slides"],
            seed=_demo["seed"],
            scale=config["demo"]["scale"],
        log:
            f"results/logs/cohorts/{_cohort}/demo_external.log",
        benchmark:
            f"results/benchmarks/cohorts/{_cohort}/demo_external.tsv"
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=per_attempt(4000),
            runtime=30,
        script:
            "../scripts/step.py"


use rule slide_qc as cohort_slide_qc with:
    input:
        path=cohort_slide_path,
    output:
        out=layout.in_cohort(layout.QC_RECORD),
    params:
        case_id=cohort_case_of,
        sheet_mpp=cohort_sheet_mpp,
    log:
        "results/logs/cohorts/{cohort}/slide_qc/{slide}.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/slide_qc/{slide}.tsv"


use rule tissue as cohort_tissue with:
    input:
        qc=layout.in_cohort(layout.QC_RECORD),
    output:
        mask_out=layout.in_cohort(layout.TISSUE_MASK),
        geojson_out=layout.in_cohort(layout.TISSUE_CONTOURS),
        thumb_out=layout.in_cohort(layout.TISSUE_THUMB),
    log:
        "results/logs/cohorts/{cohort}/tissue/{slide}.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/tissue/{slide}.tsv"


use rule patch as cohort_patch with:
    input:
        qc=layout.in_cohort(layout.QC_RECORD),
        mask=layout.in_cohort(layout.TISSUE_MASK),
        geojson=layout.in_cohort(layout.TISSUE_CONTOURS),
    output:
        lmdb_out=layout.in_cohort(layout.PATCH_STORE),
        row_out=layout.in_cohort(layout.PATCH_ROW),
    log:
        "results/logs/cohorts/{cohort}/patch/{mag}x/{slide}.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/patch/{mag}x/{slide}.tsv"


use rule qc_table as cohort_qc_table with:
    input:
        positional=lambda w: cohort_items(layout.QC_RECORD, w.cohort),
    output:
        out=layout.in_cohort(layout.QC_TABLE),
    log:
        "results/logs/cohorts/{cohort}/qc_table.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/qc_table.tsv"


use rule manifest as cohort_manifest with:
    input:
        positional=lambda w: cohort_items(layout.PATCH_ROW, w.cohort, mag=COHORT_MAGS),
    output:
        out=layout.in_cohort(layout.MANIFEST),
    log:
        "results/logs/cohorts/{cohort}/manifest.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/manifest.tsv"


use rule extract_features as cohort_extract_features with:
    input:
        rows=lambda w: expand(layout.in_cohort(layout.PATCH_ROW, w.cohort), mag=fallback_mags(w), slide=w.slide),
        pretrained=feature_pretrained,
    output:
        out=layout.in_cohort(layout.FEATURES),
    log:
        "results/logs/cohorts/{cohort}/extract_features/{encoder}/{mag}x/{slide}.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/extract_features/{encoder}/{mag}x/{slide}.tsv"


# Every fold model of a method predicts every bag of the cohort (one GPU job per task x method x cohort).
rule predict_cohort:
    input:
        models=method_models,
        slides=layout.in_cohort(layout.QC_TABLE),
        inputs=cohort_inputs,  # E2E: patch rows at the evaluation magnification; two-stage: features
        labels=lambda w: [cohort_labels(w.cohort, w.task)] if cohort_labels(w.cohort, w.task) else [],
    output:
        predictions=expand(layout.cohort_file("predictions"), fold=folds(), allow_missing=True),
        attention=expand(layout.cohort_file("attention"), fold=folds(), allow_missing=True),
        ensemble=layout.cohort_file("ensemble"),
        record=layout.cohort_file("record"),
    params:
        step="predict_cohort",
        task="{task}",
        cohort="{cohort}",
    log:
        "results/logs/predict_cohort/{cohort}/{task}/{method}.log",
    benchmark:
        "results/benchmarks/predict_cohort/{cohort}/{task}/{method}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: SLIDE_THREADS
    resources:
        mem_mb=per_attempt(16000),
        runtime=6 * 60,
        gpu=GPU,
    script:
        "../scripts/step.py"


use rule figures_cohort as figures_external with:
    input:
        slides=layout.in_cohort(layout.QC_TABLE),
        manifest=layout.in_cohort(layout.MANIFEST),
        thumbs=lambda w: cohort_items(layout.TISSUE_THUMB, w.cohort),
        tissue=[],
    output:
        out_dir=report(
            directory(layout.in_cohort(layout.COHORT_FIGURES)),
            patterns=["{name}.png"],
            caption="../report/figures_external.rst",
            category="External cohorts",
            subcategory="{cohort}",
        ),
    log:
        "results/logs/cohorts/{cohort}/figures.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/figures.tsv"


rule predict:
    input:
        predict_outputs(),


# The cohort's attention maps: the mean over the fold models of each slide's attention.
use rule maps as cohort_maps with:
    input:
        attention=lambda w: [layout.cohort_file("attention", w.cohort, w.task, w.method, k) for k in folds()],
        slides=layout.in_cohort(layout.QC_TABLE),
        rows=lambda w: cohort_items(layout.PATCH_ROW, w.cohort, mag=method_spec(w)["eval_magnification"]),
    output:
        out_dir=directory(layout.in_cohort(layout.MAPS)),
    params:
        contours_dir=lambda w: layout.folder(layout.in_cohort(layout.TISSUE_CONTOURS, w.cohort)),
    log:
        "results/logs/cohorts/{cohort}/maps/{task}/{method}.log",
    benchmark:
        "results/benchmarks/cohorts/{cohort}/maps/{task}/{method}.tsv"

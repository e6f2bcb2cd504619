# Where slides come from: the synthetic demo cohorts, written where their sample sheets are missing
# (e2epath.sources.demo). Your own cohorts come as sample sheets (config/README.md).


# The demo cohorts (the training cohort's and "another scanner"'s), planned by the resolved config
# where their sample sheets are missing.
for _cohort in [TRAINING, *COHORTS.values()]:
    if _cohort.demo is None:
        continue

    rule:
        name:
            _cohort.demo.rule
        output:
            _cohort.demo.sheet,
            list(_cohort.sheet["path"]),
            _cohort.demo.labels,
        params:
            step="demo",
            external=_cohort.demo.external,
            out=lambda w, output: str(Path(output[0]).parent),
            n_slides=_cohort.demo.n_slides,
            seed=_cohort.demo.seed,
            scale=_cohort.demo.scale,
        log:
            layout.log(_cohort.demo.rule),
        benchmark:
            layout.benchmark(_cohort.demo.rule)
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=per_attempt(4000),
            runtime=30,
        script:
            "../scripts/step.py"

"""Trained models on new slides: ensembles of fold models (`ensemble`), external cohorts
(`cohort`, the `predict_cohort` step) and single slides without Snakemake (`predict`)."""

"""Where slides come from: sample sheets and label tables (`sheets`), importers of public cohorts
(`importers`), the synthetic demo cohort (`demo`) and the pyramidal TIFF writer it uses (`slidewriter`)."""

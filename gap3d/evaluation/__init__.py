"""gap3d.evaluation: ``gap3d eval`` — the aligner vs. the mean-feature and regressor baselines."""

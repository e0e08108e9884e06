"""The evaluation protocol: which seeds and held-out splits report numbers and which choose settings, the judge
panel's size and the edit sweep."""

# Noise seeds of ``python -m training evaluate``: reported numbers never come from the seeds that chose a setting.
REPORT_SEED = 1_000_003
TUNING_SEED = 0
# ... and their held-out faces: a report judges the test split; choosing (``--tuning``) never looks at it
REPORT_SPLIT = "test"
TUNING_SPLIT = "val"
JUDGE_PANEL_SIZE = 5  # classifiers in the judge of `evaluate` (seeds: the evaluation seed and the next four)
# evaluate-edit's default sweep; 0 is the VAE round trip alone: how often the judge's readings change with no edit at
# all (the kept rates' ceiling, set by the VAE and the judge's borderline cases, not by the edit)
EDIT_SWEEP_STRENGTHS = (0.0, 0.3, 0.45, 0.6, 0.8)

"""The commands as Python: one module per subcommand, each `run(Settings(...))` (settings.py holds the dataclasses).

    evaluate.py     accuracy, NLL, Brier, ECE of a run
    demo.py         the main job on digits: two trainings and their calibration
    calibration.py  calibration, temperature scaling, ensembles, corruptions
    robustness.py   adaptive attacks with a gradient-masking sanity report
    privacy.py      split-inference feature inversion against a noise baseline
    federated.py    a Flower simulation into a run directory
    transfer.py     fine-tuning or linear probing from a run or timm weights
    study.py        methods x seeds with intervals and verdicts (study_runs.py: its spec, trainings and caches)
"""

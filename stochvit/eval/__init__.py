"""The library of measurements: no argparse, no printing; mistakes raise `ValueError` (`stochvit.errors.UserError`).

    metrics.py      accuracy, NLL, Brier, ECE; single-pass and K-sample (Monte Carlo) summaries
    calibration.py  adaptive/classwise ECE, MCE, AURC, AUROC, reliability bins; temperature scaling
    corruptions.py  CIFAR-10-C style corruptions at five severities (kornia)
    cifar_c.py      the published CIFAR-10-C / CIFAR-100-C files, memory-mapped, per corruption and severity
    attacks.py      FGSM, PGD, EOT, APGD-CE/DLR, Square, transfer attacks in [0, 1] pixel space
    privacy.py      split-inference threat model (Device, AttackerView) and feature-inversion attacks
    stats.py        bootstrap and t intervals, paired comparisons and verdicts
    transfer.py     the transfer engine: a pretrained source adapted to a new task and trained (the suite's library;
                    it trains rather than measures, but like the others it is a library with no command line)
"""

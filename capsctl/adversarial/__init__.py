"""Adversarial examples and their detection by reconstruction (``capsctl attack``,
``capsctl calibrate``, predict's "unusual" flag; docs/adversarial.md).

attacks.py   white-box L-inf attacks in pixel space on any one-label model (fgsm, bim, pgd, cw)
detector.py  the reconstruction distance, its threshold from clean validation images (kept in
             the checkpoint), the cycle-consistency check, AUROC
measure.py   attacks over a test set: accuracy under attack, detection, undetected success
figures.py   the pictures: clean vs adversarial images with reconstructions, robustness
             curves, ROC curves

Shape legend (all modules): B batch, C channels, H/W image height/width, J classes, N pixels of
one image (C*H*W).

Torch-free: the names below are what the command line offers (capsctl/cli/attack.py).
"""

METHODS = {"fgsm": "fast gradient sign, one step (Goodfellow et al. 2015)",
           "bim": "basic iterative method, from the image (Kurakin et al. 2017)",
           "pgd": "projected gradient descent, random start (Madry et al. 2018)",
           "cw": "Carlini-Wagner margin, projected steps under L-inf (Madry et al. 2018)"}
DEFAULT_QUANTILE = 0.95       # the detector's threshold: 5% of clean validation images above

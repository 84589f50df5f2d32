"""affNIST (T. Tieleman): MNIST digits under random affine transforms on a 40x40 canvas.

Files and layout
  MATLAB v5 ``.mat`` files holding one struct ``affNISTdata`` with ``image`` (1600 x N uint8,
  one picture per column; a column read in row-major order is the 40x40 picture, pinned by a test
  that round-trips MNIST padded by 6 px), ``label_int`` (1 x N) and, in the official files,
  ``label_one_of_n`` and the applied transforms. The test set comes as ``test_batches/1.mat`` ...
  ``32.mat`` (10,000 images each, the k-th transform of every MNIST test digit) or as one
  ``test.mat``; the validation set as ``validation_batches/`` or ``validation.mat``.

Where they are looked for: ``<data root>/affnist/`` for the official files and
``<data root>/affnist-synth/`` for the set made by ``capsctl data affnist-synth``; the data root is
the one MNIST uses (``--data-root`` > ``data.root`` > ``$CAPSCTL_DATA`` > ``~/.cache/capsctl``).
A downloaded ``test_batches.zip`` lying there is unpacked on first use.

Evaluation streams the files one at a time (``MatSource``): memory stays flat in N.

One file each: ``affnist_mat.py`` (the .mat layout, read and written), ``affnist_files.py``
(finding the files, the downloader), ``affnist_source.py`` (the evaluation source),
``affnist_synth.py`` (the synthetic generator). This module names the dataset's public parts
for its callers (``capsctl data``, data/build.py).

The synthetic set (``generate_round`` / ``write_synth``) follows the creator's recipe for machines
without the real files: every MNIST test digit, ``per_digit`` random affine versions, rotation
within +-20 degrees, shear within +-0.2, horizontal and vertical scale each in [0.8, 1.2], then a
random translation that keeps the whole digit inside the frame. It is written in the same layout
plus the applied transforms and a ``capsctl_synth`` marker, and is always reported as
"affnist-synth", never as affNIST.
"""

from __future__ import annotations

from capsctl.data.affnist_files import (BASE_URL, BATCH_DIRS, SINGLE_FILES, MissingDataError,
                                        download, split_files)
from capsctl.data.affnist_mat import (SIDE, STRUCT, SYNTH_MARKER, check_labels, is_synthetic,
                                      load_struct, read_mat, write_mat)
from capsctl.data.affnist_source import MatSource, open_source
from capsctl.data.affnist_synth import (SynthRanges, draw_transforms, forward_matrix,
                                        generate_round, linear_part, render, write_synth)
from capsctl.data.matfile import MAT_MAX_DEPTH, check_mat_structure

__all__ = ["BASE_URL", "BATCH_DIRS", "SINGLE_FILES", "MissingDataError", "download",
           "split_files", "SIDE", "STRUCT", "SYNTH_MARKER", "check_labels", "is_synthetic",
           "load_struct", "read_mat", "write_mat", "MatSource", "open_source", "SynthRanges",
           "draw_transforms", "forward_matrix", "generate_round", "linear_part", "render",
           "write_synth", "MAT_MAX_DEPTH", "check_mat_structure"]

"""CelebA-layout data: the reader (:mod:`training.data.celeba`) and the synthetic-face writer."""

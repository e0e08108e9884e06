"""Making models: CelebA-layout data (:mod:`training.data`), the trainers (``train_*``, :mod:`training.trainer`,
:mod:`training.runtime`), their evaluation (:mod:`training.evaluation`) and the ``python -m training`` CLI.

Builds on the served model in :mod:`facegen.model`; nothing in the served path imports this package.
"""

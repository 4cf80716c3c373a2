"""meo-fairseq: Mixture-of-Experts and MEO (Merging Experts into One) for fairseq.

Pass this folder to fairseq with ``--user-dir``. Importing it:
- allow-lists ``argparse.Namespace`` for ``torch.load(weights_only=True)`` (checkpoints of
  legacy-registered fairseq models store their args as a Namespace);
- registers the plugin's models and criteria with fairseq (fairseq itself auto-imports a user
  dir's ``models/`` and ``tasks/`` but not ``criterions/``);
- makes fairseq's ``--no-repeat-ngram-size`` block repeated n-grams (``meo_fairseq.ngram``).
The layer library (``meo_fairseq.modules``) needs only torch.
"""

import argparse

import torch

__version__ = "0.1.0"

torch.serialization.add_safe_globals([argparse.Namespace])

try:
    import fairseq  # noqa: F401
except ImportError:  # the layer library works without fairseq
    fairseq = None

if fairseq is not None:
    from . import criterions, models  # noqa: F401,E402
    from .ngram import install as _install_ngram_blocking  # noqa: E402

    _install_ngram_blocking()

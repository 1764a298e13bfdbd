"""Sampling at scale: one deterministic sampling path (``engine``), its resumable output folder (``writer``),
the typed options (``config``: imports neither torch nor Lightning, so ``--help`` answers at once) and the
``sample.py`` / ``sweep.py`` command lines (``cli``, ``sweep``)."""

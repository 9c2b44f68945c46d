"""The run folder: the only code that knows ``$RUN_DIR/<exp_name>/run_<N>/`` and what lies in it.

Torch-free, so that ``ml runs``, ``ml diff`` and bad-input errors answer without importing torch.

- :mod:`ml.run.layout`: :class:`RunDir` (where the config, checkpoints, link, status, logs and
  locks are), run numbers, finding runs under a folder;
- :mod:`ml.run.claim`: claiming a new ``run_<N>`` (and giving it back);
- :mod:`ml.run.locks`: lock files, written whole or not at all, and the ``running`` lock;
- :mod:`ml.run.checkpoints`: the one rule for the newest complete checkpoint, and the atomic
  write + link + retention of a new one;
- :mod:`ml.run.status`: ``status.json``, how the last training session ended.

Who may write (rank 0 only in a distributed job) is the caller's business: nothing here asks.
"""

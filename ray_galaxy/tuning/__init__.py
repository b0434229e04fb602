"""Ray Tune: ASHA hyperparameter sweeps of the galaxy VAE, one Ray Train run per trial.

- :mod:`.space`: the ``search_space`` (searched TrainConfig fields and their distributions),
- :mod:`.config`: the sweep's settings (:class:`~.config.TuneConfig`) and each trial's
  TrainConfig,
- :mod:`.results`: the trials table (CSV, Markdown), its plot and the best trial's export,
- :mod:`.sweep`: running a sweep (new, resumed or finished) and the job's entry point.
"""

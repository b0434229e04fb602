"""Ray Train: data-parallel (DDP) training of the galaxy VAE.

* :mod:`~ray_galaxy.training.loop` - the worker side: schedules, the gradient guard, one training
  and one validation pass, ``train_loop_per_worker``;
* :mod:`~ray_galaxy.training.trainer` - the driver: ``make_trainer``, ``train``, ``main_entry``;
* :mod:`~ray_galaxy.training.export` - the best checkpoint as a model directory, and its sampler.
"""

"""Evaluation of a trained model directory on held-out galaxies (``jobs/evaluate.py``).

* :mod:`.config`: :class:`EvaluateConfig`, the job's settings;
* :mod:`.metrics`: likelihood bounds, reconstruction scores, nearest neighbours, memorisation,
  and the metric keys of metrics.json;
* :mod:`.morphology`: CAS, Gini/M20, size, shape and colour of galaxy images;
* :mod:`.classes`: whether conditional samples come out as the class asked for;
* :mod:`.properties`: whether galaxies to order (--match, --where) come out as asked;
* :mod:`.report`: the charts and report.md;
* :mod:`.evaluate`: the steps of one evaluation, in order.

Generated galaxies come from :class:`ray_galaxy.generation.Generator`, like every other job's.
"""

"""Ray Serve application: a galaxy generator behind an HTTP API (FastAPI, OpenAPI at /docs).

Two deployments: :mod:`~ray_galaxy.serve.decoder` (the model, dynamic batching) and
:mod:`~ray_galaxy.serve.ingress` (the HTTP API, the routes of :mod:`~ray_galaxy.serve.routes`).
:mod:`~ray_galaxy.serve.app` binds them (``import_path: ray_galaxy.serve.app:app_builder``),
:mod:`~ray_galaxy.serve.yaml_check` checks a Serve config file, and
:mod:`~ray_galaxy.serve.runner` is what ``python jobs/serve.py`` runs.

Kept free of imports so ``import ray_galaxy.serve.config`` stays light.
"""

"""Strict checks of a Serve config file (cluster/serve.yaml, the RayService's serveConfigV2).

Ray's ``ServeDeploySchema`` ignores unknown keys (forward compatibility), so a typo such as
``max_replica`` would silently do nothing; these checks name it instead.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from ray_galaxy.config import ConfigError, read_yaml
from ray_galaxy.serve.app import merge_deployment_options
from ray_galaxy.serve.config import DEPLOYMENT_NAMES, IMPORT_PATH, serve_config


def _model_of(annotation: Any) -> Any:
    """The pydantic model class inside an annotation (Optional/Union/List unwrapped), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _strict_keys(value: Any, model: Any, where: str, errors: list[str]) -> None:
    """Every key of ``value`` (recursively) that ``model`` has no field for."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _strict_keys(item, model, f"{where}[{i}]", errors)
        return
    if not isinstance(value, dict):
        return
    fields = model.model_fields
    valid = set(fields) | {f.alias for f in fields.values() if f.alias}
    for key in value:
        if key not in valid:
            errors.append(f"{where}: unknown key {key!r}; valid keys are: {', '.join(fields)}")
            continue
        inner = _model_of(fields[key].annotation) if key in fields else None
        if inner is not None:
            _strict_keys(value[key], inner, f"{where}.{key}", errors)


def _check_app(app: dict[str, Any], where: str, merge: bool = True) -> list[str]:
    """Problems of one ray-galaxy application: its args, deployment names and (with ``merge``,
    when nothing else is wrong so far) its deployment options."""
    try:
        cfg = serve_config(app.get("args") or {})
    except ConfigError as e:
        return [f"{where}.args: {e}"]
    errors, overrides = [], {}
    for d in app.get("deployments") or []:
        if d.get("name") not in DEPLOYMENT_NAMES:
            errors.append(f"{where}.deployments: unknown deployment {d.get('name')!r}; "
                          f"valid names are: {', '.join(DEPLOYMENT_NAMES)}")
        else:
            overrides[d["name"]] = d
    if errors or not merge:
        return errors
    try:
        merge_deployment_options(cfg, overrides)
    except ConfigError as e:
        return [f"{where}: {e}"]
    return []


def check_serve_config(data: Any) -> list[str]:
    """Every problem of a Serve config file, ``[]`` when it is good.

    Checks the schema, then every key against the schema's fields, and for each application
    of ours (``import_path: ray_galaxy.serve.app:app_builder``) the ``args`` against
    :class:`~ray_galaxy.serve.config.ServeConfig`, the deployment names, and that the decoder's
    ``max_ongoing_requests`` lets batches fill.
    """
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    errors: list[str] = []
    _strict_keys(data, ServeDeploySchema, "<root>", errors)
    for i, app in enumerate(data.get("applications") or []):
        if app.get("import_path") == IMPORT_PATH:
            errors += _check_app(app, f"applications[{i}]", merge=not errors)
    return errors


def load_serve_config(path: str, app_name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full config, the chosen application) from a checked Serve config file."""
    data = read_yaml(path)
    problems = check_serve_config(data)
    if problems:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(problems))
    apps = [a for a in data["applications"] if a.get("import_path") == IMPORT_PATH]
    if app_name is not None:
        apps = [a for a in apps if a.get("name", "default") == app_name]
    if not apps:
        raise ConfigError(f"{path}: no application with import_path {IMPORT_PATH}"
                          + (f" named {app_name!r}" if app_name else ""))
    return data, apps[0]

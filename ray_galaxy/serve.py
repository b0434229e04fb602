"""Ray Serve application: a galaxy generator behind an HTTP API (FastAPI, OpenAPI at /docs).

Two deployments:

* ``Decoder`` holds the model (one per replica, CPU or GPU) and decodes latent codes to 8-bit
  images with ``@serve.batch``: latent rows from concurrent requests are stacked into one
  forward pass of up to ``max_batch_size`` rows (a request's rows are sent in chunks of at most
  that many, and ``batch_size_fn`` counts rows, not calls). The decoder runs in float64, so a
  latent gives byte-identical pixels whatever else shares its batch.
* ``GalaxyAPI`` is the HTTP ingress. It reads ``config.json`` (not the weights), draws prior
  latents, interpolates and builds traversals, validates every input (a bad one is a 4xx JSON
  error naming the field, never a 5xx), checks the optional bearer token, encodes PNG/zip/npy,
  and calls the decoder through a :class:`DeploymentHandle`.

Start it with ``python jobs/serve.py --model URI`` or ``serve run cluster/serve.yaml``
(``import_path: ray_galaxy.serve:app_builder``, the :class:`ServeConfig` fields as ``args``).
Redeploying with a new model URI replaces the replicas with a rolling update that starts the
new replicas before the old ones stop (``max_surge_percent: 100``), so no request is dropped.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route signatures built in
# build_fastapi() at runtime, and their annotations name objects local to that function.
import asyncio
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from ray import serve

from ray_galaxy.config import ConfigError, ModelConfig, from_mapping

logger = logging.getLogger("ray.serve")

APP_NAME = "galaxy"
INGRESS = "GalaxyAPI"
DECODER = "Decoder"
DEPLOYMENT_NAMES = (INGRESS, DECODER)

# Request limits (part of the API: changing them changes what clients may send).
MAX_N = 64                  # images per POST /sample
MAX_SEED = 2 ** 63 - 1      # torch.Generator.manual_seed range we accept
MAX_TEMPERATURE = 10.0
MAX_ABS_LATENT = 100.0      # |z_i| bound for latent vectors sent by clients
MAX_INTERP_STEPS = 32
MAX_TRAVERSE_STEPS = 16
MAX_TRAVERSE_RANGE = 10.0
EXPLORER_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The explorer page sets this cookie from ``GET /?token=...``: a browser cannot send a bearer
# header when it loads a page, its script and its images.
TOKEN_COOKIE = "ray_galaxy_token"
# How long the ingress keeps retrying while the decoder is unavailable or mid-swap.
DECODER_RETRY_S = 20.0


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServeConfig:
    """Application arguments (``args:`` in cluster/serve.yaml; flags of jobs/serve.py)."""

    model: str = "runs/galaxy-vae/model"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_body_bytes: int = 8 * 1024 * 1024
    token_env: str = "RAY_GALAXY_TOKEN"
    device: str = "auto"
    torch_threads: int = 0
    # Rows per forward pass inside a decoder batch. 0 = auto: the whole batch on a GPU, one row
    # at a time on a CPU, where the float64 decoder is fastest per image on single rows (its
    # activations for a bigger batch spill the cache; benchmarks/README.md has the sweep).
    # Batching still pays there: one replica call and one thread hand-off per batch.
    decode_chunk_rows: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: a model directory path or URI is required")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError(f"max_batch_size must be in 1..1024, got {self.max_batch_size}")
        if not (math.isfinite(self.batch_wait_timeout_s) and 0 <= self.batch_wait_timeout_s <= 5):
            raise ConfigError(f"batch_wait_timeout_s must be in [0, 5], got {self.batch_wait_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.decode_chunk_rows < 0:
            raise ConfigError(f"decode_chunk_rows must be >= 0 (0 = auto), got {self.decode_chunk_rows}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def serve_config(args: Mapping[str, Any] | ServeConfig) -> ServeConfig:
    """A :class:`ServeConfig` from application args; unknown keys are a :class:`ConfigError`."""
    if isinstance(args, ServeConfig):
        return args
    return from_mapping(ServeConfig, dict(args or {}), source="serve application args")


class ApiError(Exception):
    """A request error answered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


class _Token:
    """The bearer token, kept out of reprs and logs."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "_Token(***)"

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(self.value.encode(), presented.encode())


def _resolve_uri(uri: str) -> str:
    """Local relative paths become absolute (replicas may run in another directory)."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def model_version(uri: str) -> str:
    """Version of a model directory: sha256 of its URI and model.pt bytes (16 hex digits)."""
    from ray_galaxy.checkpoint import MODEL_FILE, join, read_bytes

    h = hashlib.sha256(uri.encode())
    h.update(b"\0")
    h.update(read_bytes(join(uri, MODEL_FILE)))
    return h.hexdigest()[:16]


def metrics_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar training metrics worth showing in /info (best epoch, data counts)."""
    best = metrics.get("best") or {}
    keys = ("epoch", "train_loss", "val_loss", "val_recon", "val_kl", "val_psnr", "val_bpd",
            "decoder_sigma")
    data = metrics.get("data") or {}
    return {
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "best": {k: best[k] for k in keys if isinstance(best.get(k), (int, float))},
        "data": {k: data[k] for k in ("source", "train_images", "val_images", "skipped") if k in data},
    }


def default_traverse_dims(metrics: Mapping[str, Any], latent_dim: int) -> tuple[int, int] | None:
    """The two latent dims the training run drew its traversal with, else the most active."""
    dims = metrics.get("traversal_dims")
    if isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) for d in dims) \
            and dims[0] != dims[1] and all(0 <= d < latent_dim for d in dims):
        return int(dims[0]), int(dims[1])
    kl = (metrics.get("best") or {}).get("val_kl_per_dim")
    if isinstance(kl, list) and len(kl) == latent_dim and latent_dim >= 2:
        from ray_galaxy.figures import most_active_dims

        a, b = most_active_dims(kl, 2)
        return a, b
    return (0, 1) if latent_dim >= 2 else None


def prior_latents(model_config: ModelConfig, n: int, seed: int, temperature: float) -> np.ndarray:
    """Exactly the latents ``ConvVAE.sample(n, seed, temperature)`` decodes, without the weights.

    ``ConvVAE.prior_latents`` only reads ``self.config``; calling it on a stand-in keeps the
    ingress light and the two paths identical.
    """
    from types import SimpleNamespace

    from ray_galaxy.model import ConvVAE

    stand_in = SimpleNamespace(config=model_config)
    return ConvVAE.prior_latents(stand_in, n, seed, temperature).numpy()  # type: ignore[arg-type]


def endpoint_latent(model_config: ModelConfig, value: int | list[float], field: str,
                    temperature: float,
                    draw: Callable[[ModelConfig, int, int, float], np.ndarray] | None = None
                    ) -> np.ndarray:
    """An interpolation endpoint: a seed's code (``draw``, default the prior), or a latent
    vector of the right length."""
    if isinstance(value, int):
        return (draw or prior_latents)(model_config, 1, value, temperature)[0]
    if len(value) != model_config.latent_dim:
        raise ApiError(422, f"{field}: a latent vector must have {model_config.latent_dim} values, "
                            f"got {len(value)}", field)
    return np.asarray(value, dtype=np.float32)


def activity_order(metrics: Mapping[str, Any], latent_dim: int,
                   gmm: Mapping[str, Any] | None = None) -> list[int]:
    """Latent dimensions, most used first: by the GMM sampler's per-dimension variance when the
    model has one, else by the validation KL per dimension (an inactive dimension carries ~0 KL
    and changes nothing when moved), else in index order."""
    score = None
    if gmm is not None:
        from ray_galaxy.evaluate import gmm_variance

        score = [float(v) for v in gmm_variance(gmm)]
    else:
        kl = (metrics.get("best") or {}).get("val_kl_per_dim")
        if isinstance(kl, list) and len(kl) == latent_dim \
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in kl):
            score = [float(v) for v in kl]
    if score is None or len(score) != latent_dim:
        return list(range(latent_dim))
    return sorted(range(latent_dim), key=lambda i: (-score[i], i))


def model_name(uri: str) -> str:
    """A short display name: the run directory of ``<storage>/<name>/model``, else the last part."""
    parts = [p for p in uri.rstrip("/").replace("\\", "/").split("/") if p and not p.endswith(":")]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else uri


def slerp(z0: np.ndarray, z1: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` codes from z0 to z1 (both included) by spherical interpolation.

    Slerp of unnormalised vectors (Shoemake 1985; White 2016, "Sampling Generative Networks"):
    the path keeps a plausible norm under the Gaussian prior where a straight line would pass
    near the origin. Falls back to a straight line when the angle is ~0 or ~pi, or a vector is 0.
    """
    a, b = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na > 0 and nb > 0:
        omega = math.acos(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0)))
        so = math.sin(omega)
        if so > 1e-6:
            return (np.sin((1.0 - t) * omega) / so * a + np.sin(t * omega) / so * b).astype(np.float32)
    return ((1.0 - t) * a + t * b).astype(np.float32)


# --------------------------------------------------------------------------- decoder deployment


def _rows(items: list[tuple[np.ndarray, int | None, int]]) -> int:
    """Batch size in latent rows (a call may carry several)."""
    return sum(len(item[0]) for item in items)


@serve.deployment(name=DECODER)
class Decoder:
    """Holds the model; decodes latent rows to uint8 images in dynamic batches."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from ray_galaxy.checkpoint import load_model_dir

        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        md = load_model_dir(config.model, device=device)
        self.model = md.model
        self.device = device
        self.version = model_version(config.model)
        self.latent_dim = md.model_config.latent_dim
        self.image_size = md.model_config.image_size
        self.chunk_rows = config.decode_chunk_rows or (1 if device == "cpu" else config.max_batch_size)
        self.detail = self._load_detail(config.model)
        self._decode_batch.set_max_batch_size(config.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stats_counts = {"batches": 0, "rows": 0, "calls": 0, "max_rows": 0, "max_calls": 0}
        logger.info("Decoder ready: model %s version %s on %s (max_batch_size %d)",
                    config.model, self.version, device, config.max_batch_size)

    @staticmethod
    def _load_detail(uri: str) -> dict[str, Any] | None:
        """The residual detail model of the directory's sampler (None without one)."""
        from ray_galaxy.evaluate import SamplerError, detail_model, load_sampler

        try:
            return detail_model(load_sampler(uri))
        except (SamplerError, OSError, ValueError, KeyError) as e:
            logger.warning("no residual detail for %s: %s", uri, e)
            return None

    def _decode_now(self, items: list[tuple[np.ndarray, int | None, int]]) -> list[np.ndarray]:
        """Decode every item's rows in one pass (chunks of chunk_rows), then add each item's
        residual detail: drawn from its own seed, skipping the ``offset`` rows of the request
        that other calls decode, so a request gives the same bytes as ``evaluate.generate``."""
        import torch

        from ray_galaxy.detail import add_detail
        from ray_galaxy.model import to_uint8

        z = np.concatenate([item[0] for item in items])
        step = self.chunk_rows
        means = torch.cat([self.model.decode(torch.from_numpy(z[i:i + step])) for i in range(0, len(z), step)])
        out, start = [], 0
        for rows, noise_seed, offset in items:
            m = means[start:start + len(rows)]
            start += len(rows)
            if noise_seed is not None and self.detail is not None:
                m = add_detail(m, self.detail, seed=noise_seed, offset=offset)
            out.append(to_uint8(m).numpy())
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _decode_batch(self, items: list[tuple[np.ndarray, int | None, int]]) -> list[np.ndarray]:
        parts = await asyncio.to_thread(self._decode_now, items)
        rows = sum(len(p) for p in parts)
        s = self.stats_counts
        s["batches"] += 1
        s["rows"] += rows
        s["calls"] += len(items)
        s["max_rows"] = max(s["max_rows"], rows)
        s["max_calls"] = max(s["max_calls"], len(items))
        return parts

    def _mismatch(self, what: str) -> dict[str, Any]:
        """Answer for input shaped for another model (only while a swap to a model with another
        latent_dim or image_size rolls out): the caller rebuilds its input for this model."""
        return {"mismatch": what, "model_config": self.model.config.to_dict(), "version": self.version}

    async def decode(self, z: np.ndarray | dict[str, Any]) -> dict[str, Any]:
        """(k, latent_dim) float32 -> {"images": (k, S, S, 3) uint8, "version"}: the means.

        ``{"z": ..., "detail_seed": S, "offset": o}`` draws from p(x | z) with the sampler's residual
        detail instead (rows o.. of a request seeded S); without a detail model, the means.
        """
        noise_seed, offset = None, 0
        if isinstance(z, dict):
            noise_seed, offset, z = z.get("detail_seed"), int(z.get("offset", 0)), z["z"]
        z = np.ascontiguousarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            return self._mismatch(f"expected (k, {self.latent_dim}) latents, got {z.shape}")
        step = self.config.max_batch_size
        parts = await asyncio.gather(*(self._decode_batch((z[i:i + step], noise_seed, offset + i))
                                       for i in range(0, len(z), step)))
        return {"images": np.concatenate(parts), "version": self.version}

    async def reconstruct(self, image: np.ndarray) -> dict[str, Any]:
        """(S, S, 3) uint8 -> {"images": (1, S, S, 3) uint8, "version"}: the decoded posterior mean.

        Encoding and decoding happen in the same replica, so both use the same model.
        """
        if image.shape != (self.image_size, self.image_size, 3):
            return self._mismatch(f"expected a {self.image_size}px image, got {image.shape}")

        def encode() -> np.ndarray:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255)
            with torch.inference_mode():
                mu, _ = self.model.encode(x.to(self.device))
            return mu.float().cpu().numpy()

        mu = await asyncio.to_thread(encode)
        return {"images": await self._decode_batch((mu, None, 0)), "version": self.version}

    def stats(self) -> dict[str, Any]:
        """Batching counters of this replica (for tests and benchmarks)."""
        return {"version": self.version, **self.stats_counts}


# --------------------------------------------------------------------------- HTTP ingress


class _BodyTooLarge(Exception):
    pass


def _error_response(status: int, message: str, field: str | None = None,
                    headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _relative_path(scope: Mapping[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _header(scope: Mapping[str, Any], name: bytes) -> str:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return ""


def _cookie(scope: Mapping[str, Any], name: str) -> str:
    from urllib.parse import unquote

    for part in _header(scope, b"cookie").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return unquote(v.strip().strip('"'))
    return ""


_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>ray-galaxy: token required</title></head>
<body style="font-family:sans-serif;background:#0b0e17;color:#dde;padding:3em">
<h1>ray-galaxy</h1><p>{message}</p>
<form method="get" action="{action}"><label>Token <input name="token" type="password" autofocus>
</label> <button>Open the explorer</button></form></body></html>"""


class _AuthMiddleware:
    """Bearer-token check on every route but /healthz (401 without or with a wrong token).

    A browser cannot put a bearer header on a page load or an ``<img>``, so the explorer page
    takes the token once as ``GET /?token=...``: the answer is a redirect that drops it from the
    address bar and stores it in an HttpOnly, SameSite=Strict cookie, which then stands in for
    the header (a cross-site page never gets it sent along).
    """

    def __init__(self, app: Any, token: _Token) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        import html
        from urllib.parse import parse_qs, quote

        from starlette.responses import HTMLResponse, RedirectResponse

        path = _relative_path(scope)
        if scope["type"] != "http" or path == "/healthz":
            return await self.app(scope, receive, send)
        root = scope.get("root_path", "") or ""
        page = path == "/" and scope.get("method") in ("GET", "HEAD")
        if page:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "token" in query:
                if self.token.matches(query["token"][0]):
                    resp = RedirectResponse(root + "/", status_code=303)
                    resp.set_cookie(TOKEN_COOKIE, quote(self.token.value, safe=""), path=root or "/",
                                    httponly=True, samesite="strict")
                    return await resp(scope, receive, send)
                return await HTMLResponse(_LOGIN_PAGE.format(message="That token is not valid.",
                                                             action=html.escape(root + "/")),
                                          status_code=401)(scope, receive, send)
        auth = _header(scope, b"authorization")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() == "bearer" and presented.strip():
            ok = self.token.matches(presented.strip())
        else:
            cookie = _cookie(scope, TOKEN_COOKIE)
            ok = bool(cookie) and self.token.matches(cookie)
        if ok:
            return await self.app(scope, receive, send)
        if page and "text/html" in _header(scope, b"accept"):
            return await HTMLResponse(
                _LOGIN_PAGE.format(message="This server needs its access token.",
                                   action=html.escape(root + "/")),
                status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        message = "missing bearer token" if not auth else "invalid bearer token"
        resp = _error_response(401, message, "authorization", {"WWW-Authenticate": "Bearer"})
        return await resp(scope, receive, send)


class _BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: by Content-Length, or counted while it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error_response(413, f"request body exceeds {self.limit} bytes", "body")
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return await _error_response(400, "invalid Content-Length", "body")(scope, receive, send)
                if declared > self.limit:
                    return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


def _field_of(loc: tuple | list) -> str:
    """The request field a pydantic error location points at ("body" for the body itself)."""
    if len(loc) > 1 and isinstance(loc[1], str):
        return loc[1]
    return str(loc[0]) if loc else "body"


def _explorer_file(name: str) -> bytes:
    """A file of the latent explorer page, shipped in the package (ray_galaxy/explorer/)."""
    from importlib.resources import files

    return (files("ray_galaxy") / "explorer" / name).read_bytes()


def _png_response(png: bytes, version: str):
    from starlette.responses import Response

    return Response(png, media_type="image/png", headers={"X-Model-Version": version})


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str | None, str | None, bytes]]:
    """(name, filename, data) of each part of a multipart/form-data body (byte-exact, stdlib only)."""
    from email.message import Message

    m = Message()
    m["content-type"] = content_type
    boundary = m.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ApiError(400, "multipart body without a boundary", "file")
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise ApiError(400, "malformed multipart body", "file")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart part", "file")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        hm = Message()
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip():
                hm[k.strip()] = v.strip()
        name = hm.get_param("name", header="content-disposition")
        parts.append((name if isinstance(name, str) else None, hm.get_filename(), data))
    return parts


@serve.deployment(name=INGRESS)
@serve.ingress()
class GalaxyAPI:
    """The HTTP API; the FastAPI app is built per replica (it closes over this instance)."""

    def __init__(self, config: ServeConfig, decoder: Any, token: _Token | None = None) -> None:
        from ray_galaxy.checkpoint import CONFIG_FILE, METRICS_FILE, ModelDirError, join, read_bytes

        self.config = config
        self.decoder = decoder
        self.token = token
        try:
            model_dir_config = json.loads(read_bytes(join(config.model, CONFIG_FILE)))
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{config.model} is not a finished model directory: {e}") from None
        self.model_config = ModelConfig.from_dict(model_dir_config["model"])
        self.train_config = model_dir_config.get("train") or {}
        try:
            metrics = json.loads(read_bytes(join(config.model, METRICS_FILE)))
        except (OSError, ValueError):
            metrics = {}
        self.metrics = metrics
        self.version = model_version(config.model)
        self.latent_dim = self.model_config.latent_dim
        self.image_size = self.model_config.image_size
        self.traverse_dims = default_traverse_dims(metrics, self.latent_dim)
        crop = self.train_config.get("crop", 1.0)
        self.crop = float(crop) if isinstance(crop, (int, float)) and 0 < crop <= 1 else 1.0
        self.gmm, self.sampler_problem = self._load_sampler(config.model)
        self.samplers = ["prior"] + (["gmm"] if self.gmm is not None else [])
        self.dims_by_activity = activity_order(metrics, self.latent_dim, self.gmm)

    @staticmethod
    def _load_sampler(uri: str) -> tuple[dict[str, Any] | None, str | None]:
        """The model directory's GMM sampler, or (None, why not). A stale or unreadable one is
        logged and left out rather than failing the app: the prior still works."""
        from ray_galaxy.evaluate import SamplerError, load_sampler

        try:
            gmm = load_sampler(uri)
        except (SamplerError, OSError, ValueError, KeyError) as e:
            logger.warning("not serving the GMM sampler of %s: %s", uri, e)
            return None, str(e)
        return gmm, (None if gmm is not None else "the model directory has no sampler.pt")

    def latents(self, cfg: ModelConfig, n: int, seed: int, temperature: float,
                sampler: str = "auto") -> np.ndarray:
        """(n, latent_dim) codes for ``seed`` from the prior or the model's GMM sampler."""
        if sampler == "auto" and cfg != self.model_config:
            sampler = "prior"  # mid-swap, rebuilt for the new model: its sampler is not loaded here
        sampler = self.resolve_sampler(sampler)
        if sampler == "prior":
            return prior_latents(cfg, n, seed, temperature)
        if self.gmm is None:
            raise ApiError(422, f"sampler: this model has no GMM sampler ({self.sampler_problem}); "
                                "use 'prior' or fit one with jobs/fit_sampler.py", "sampler")
        if cfg != self.model_config:  # mid-swap: the sampler belongs to this replica's model
            raise ApiError(503, "sampler: the model is being replaced; retry", "sampler")
        from ray_galaxy.evaluate import gmm_latents

        return gmm_latents(self.gmm, n, seed, temperature).numpy()

    def resolve_sampler(self, sampler: str) -> str:
        """'auto' is the model's GMM sampler when it has one (its N(0, I) prior samples land in
        holes of the latent space when the KL weight is small), else the prior."""
        if sampler == "auto":
            return "gmm" if self.gmm is not None else "prior"
        return sampler

    def detail_seed(self, cfg: ModelConfig, sampler: str, detail: bool, seed: int) -> int | None:
        """The noise seed of a /sample request's residual detail, None for decoder means: only
        draws of this replica's model from its GMM sampler get detail (the decoder adds it when
        its sampler has a detail model)."""
        if not detail or cfg != self.model_config or self.resolve_sampler(sampler) != "gmm":
            return None
        return seed

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)

    # ------------------------------------------------------------------ decoder calls
    async def _call(self, method: str, arg: Any, deadline: float) -> dict[str, Any]:
        """One decoder call, retried while no replica is available; 503 past ``deadline``."""
        import ray.exceptions
        from ray.serve.exceptions import RayServeException

        delay = 0.05
        while True:
            try:
                return await getattr(self.decoder, method).remote(arg)
            except (RayServeException, ray.exceptions.RayActorError) as e:
                reason = f"{type(e).__name__}: {e}"
            if time.monotonic() + delay > deadline:
                raise ApiError(503, f"decoder unavailable: {reason}", None, {"Retry-After": "5"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def run(self, build: Callable[[ModelConfig], np.ndarray], method: str = "decode",
                  detail_seed: Callable[[ModelConfig], int | None] | None = None) -> tuple[np.ndarray, str]:
        """Decoder input built by ``build(model_config)`` -> (uint8 images, model version(s)).

        ``decode`` input (latent rows) goes in chunks of at most max_batch_size rows. While a swap
        to a model with another latent_dim or image_size rolls out, an old ingress replica may meet
        only new decoders (or the other way round): the decoder then answers with its model
        config and the input is rebuilt for that model, so the request is still served. One that
        cannot be (a latent vector of the old length) gets 503 and Retry-After. ``detail_seed(cfg)``,
        when given and not None, asks the decoder for draws with residual detail from that seed.
        """
        cfg = self.model_config
        data = build(cfg)  # validation errors (422) come from here, against this replica's model
        deadline = time.monotonic() + DECODER_RETRY_S
        delay = 0.05
        while True:
            if method == "decode":
                step = self.config.max_batch_size
                noise = detail_seed(cfg) if detail_seed else None
                outs = await asyncio.gather(*(
                    self._call("decode", data[i:i + step] if noise is None else
                               {"z": data[i:i + step], "detail_seed": noise, "offset": i}, deadline)
                    for i in range(0, len(data), step)))
            else:
                outs = [await self._call(method, data, deadline)]
            mismatched = [o for o in outs if "mismatch" in o]
            if not mismatched:
                versions = sorted({o["version"] for o in outs})
                return np.concatenate([o["images"] for o in outs]), ",".join(versions)
            other = ModelConfig.from_dict(mismatched[0]["model_config"])
            if other != cfg:
                logger.info("decoder %s serves another model (%s); rebuilding the request for it",
                            mismatched[0]["version"], mismatched[0]["mismatch"])
                try:
                    data, cfg = build(other), other
                except (ApiError, ValueError):
                    raise ApiError(503, "the model is being replaced and this request does not fit "
                                        "the new one; retry", None, {"Retry-After": "5"}) from None
            if time.monotonic() + delay > deadline:
                raise ApiError(503, f"decoder unavailable: {mismatched[0]['mismatch']}", None,
                               {"Retry-After": "5"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "version": self.version,
            "latent_dim": self.latent_dim,
            "image_size": self.image_size,
            "model_config": self.model_config.to_dict(),
            "train_config": self.train_config,
            "metrics": metrics_summary(self.metrics),
            "traverse_dims": list(self.traverse_dims) if self.traverse_dims else None,
            "name": model_name(self.config.model),
            "dims_by_activity": self.dims_by_activity,
            "samplers": self.samplers,
            "sampler": ({k: self.gmm["meta"].get(k) for k in ("kind", "components", "covariance", "kernels", "bandwidth")}
                        if self.gmm is not None else None),
            "serving": {
                "max_batch_size": self.config.max_batch_size,
                "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
                "max_n": MAX_N,
                "max_body_bytes": self.config.max_body_bytes,
                "auth": self.token is not None,
            },
        }


def build_fastapi(svc: GalaxyAPI):
    """The FastAPI app of one ingress replica."""
    from typing import Annotated, Literal, Union

    from fastapi import Body, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel, ConfigDict, Field, StrictInt
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    from ray_galaxy.data import BadImage, decode_image
    from ray_galaxy.figures import grid, png_bytes, traversal_latents

    Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
    Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
    LatentValue = Annotated[float, Field(ge=-MAX_ABS_LATENT, le=MAX_ABS_LATENT, allow_inf_nan=False)]
    Endpoint = Union[Seed, list[LatentValue]]
    SamplerName = Literal["auto", "prior", "gmm"]
    sampler_doc = ("prior: N(0, T^2 I); gmm: the model's two-stage sampler (see /info samplers); "
                   "auto (default): gmm when the model has one, else prior")
    detail_doc = ("with the gmm sampler: draw from p(x|z), the decoded mean plus the sampler's residual "
                  "detail (seeded by seed); false: the decoder's mean")

    class SampleRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = Field(16, ge=1, le=MAX_N, description="number of galaxies")
        seed: Seed = Field(0, description="the same seed and model give the same images")
        temperature: Temperature = Field(1.0, description="scale of the prior N(0, T^2 I)")
        format: Literal["grid", "zip", "npy"] = Field(
            "grid", description="grid: one PNG mosaic; zip: one PNG per galaxy; npy: (n, S, S, 3) uint8")
        sampler: SamplerName = Field("auto", description=sampler_doc)
        detail: bool = Field(True, description=detail_doc)

    class InterpolateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        from_: Endpoint = Field(..., alias="from", description="a seed, or a latent vector")
        to: Endpoint = Field(..., description="a seed, or a latent vector")
        steps: int = Field(8, ge=2, le=MAX_INTERP_STEPS)
        temperature: Temperature = Field(1.0, description="prior scale for seed endpoints")
        sampler: SamplerName = Field("auto", description="sampler of seed endpoints: " + sampler_doc)

    class DecodeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        z: list[LatentValue] = Field(..., description="one latent vector (latent_dim values)")

    app = FastAPI(
        title="ray-galaxy",
        version="1",
        description=("Galaxy images from a convolutional VAE. Errors are JSON "
                     '`{"error": ..., "field": ...}`. Send `Authorization: Bearer <token>` when '
                     "the server was started with a token (every route but /healthz)."),
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
        field = _field_of(tuple(errors[0].get("loc", ("body",))))
        # A union (seed or vector) fails once per branch: the deepest location is the one that
        # says what is wrong (e.g. "to.list[...].2: Input should be a finite number").
        same = [e for e in errors if _field_of(tuple(e.get("loc", ("body",)))) == field]
        best = max(same, key=lambda e: len(e.get("loc", ())))
        return _error_response(422, f"{field}: {best.get('msg', 'invalid value')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}")

    def only(request: Request, allowed: tuple[str, ...]) -> None:
        for key in request.query_params:
            if key not in allowed:
                raise ApiError(422, f"{key}: unknown query parameter; valid ones are: "
                                    f"{', '.join(allowed) or '(none)'}", key)

    @app.get("/healthz", summary="Liveness (never needs the token)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", summary="Model, version, training metrics and serving settings")
    async def info(request: Request) -> dict[str, Any]:
        only(request, ())
        return svc.info()

    png = {"content": {"image/png": {}}, "description": "PNG image"}

    @app.get("/sample", response_class=Response, responses={200: png},
             summary="One galaxy from the prior (same seed + model: byte-identical PNG)")
    async def sample_one(
        request: Request,
        seed: Annotated[int, Query(ge=0, le=MAX_SEED)] = 0,
        temperature: Annotated[float, Query(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = 1.0,
        sampler: Annotated[SamplerName, Query(description=sampler_doc)] = "auto",
        detail: Annotated[bool, Query(description=detail_doc)] = True,
    ):
        only(request, ("seed", "temperature", "sampler", "detail"))
        images, version = await svc.run(lambda cfg: svc.latents(cfg, 1, seed, temperature, sampler),
                                        detail_seed=lambda cfg: svc.detail_seed(cfg, sampler, detail, seed))
        return _png_response(png_bytes(images[0]), version)

    @app.post("/sample", response_class=Response,
              responses={200: {"content": {"image/png": {}, "application/zip": {},
                                           "application/octet-stream": {}}}},
              summary="n galaxies as a PNG grid, a zip of PNGs, or a .npy array")
    async def sample_many(req: Annotated[SampleRequest, Body()]):
        images, version = await svc.run(
            lambda cfg: svc.latents(cfg, req.n, req.seed, req.temperature, req.sampler),
            detail_seed=lambda cfg: svc.detail_seed(cfg, req.sampler, req.detail, req.seed))
        headers = {"X-Model-Version": version}
        if req.format == "grid":
            return _png_response(png_bytes(grid(images)), version)
        if req.format == "npy":
            buf = io.BytesIO()
            np.save(buf, images, allow_pickle=False)
            headers["Content-Disposition"] = f'attachment; filename="galaxies-seed{req.seed}.npy"'
            return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for i, img in enumerate(images):
                info = zipfile.ZipInfo(f"galaxy_{i:02d}.png", date_time=(1980, 1, 1, 0, 0, 0))
                zf.writestr(info, png_bytes(img))
        headers["Content-Disposition"] = f'attachment; filename="galaxies-seed{req.seed}.zip"'
        return Response(buf.getvalue(), media_type="application/zip", headers=headers)

    @app.post("/interpolate", response_class=Response, responses={200: png},
              summary="A strip of galaxies along the spherical path (slerp) between two codes")
    async def interpolate(req: Annotated[InterpolateRequest, Body()]):
        def build(cfg: ModelConfig) -> np.ndarray:
            def draw(c: ModelConfig, n: int, seed: int, t: float) -> np.ndarray:
                return svc.latents(c, n, seed, t, req.sampler)

            z0 = endpoint_latent(cfg, req.from_, "from", req.temperature, draw)
            return slerp(z0, endpoint_latent(cfg, req.to, "to", req.temperature, draw), req.steps)

        images, version = await svc.run(build)
        return _png_response(png_bytes(grid(images, ncols=req.steps)), version)

    @app.get("/traverse", response_class=Response, responses={200: png},
             summary="Two latent dims swept over rows and columns, the others at 0")
    async def traverse(
        request: Request,
        dims: Annotated[str | None, Query(description="two latent indices, e.g. 0,1 "
                                                      "(default: the training run's traversal dims)")] = None,
        steps: Annotated[int, Query(ge=2, le=MAX_TRAVERSE_STEPS)] = 8,
        span: Annotated[float, Query(alias="range", gt=0, le=MAX_TRAVERSE_RANGE, allow_inf_nan=False,
                                     description="values run from -range to +range")] = 3.0,
        center: Annotated[str | None, Query(description="comma-separated latent vector for the other "
                                                        "dims (default: all 0)")] = None,
    ):
        only(request, ("dims", "steps", "range", "center"))
        base = None
        if center is not None:
            try:
                base = [float(v) for v in center.split(",")]
            except ValueError:
                raise ApiError(422, "center: expected comma-separated numbers", "center") from None
            if len(base) != svc.latent_dim:
                raise ApiError(422, f"center: a latent vector must have {svc.latent_dim} values, "
                                    f"got {len(base)}", "center")
            if not all(math.isfinite(v) and abs(v) <= MAX_ABS_LATENT for v in base):
                raise ApiError(422, f"center: values must be finite and within +-{MAX_ABS_LATENT:g}", "center")
        if dims is None:
            if svc.traverse_dims is None:
                raise ApiError(422, "dims: this model has a single latent dimension", "dims")
            pair = svc.traverse_dims
        else:
            try:
                pair = tuple(int(d) for d in dims.split(","))
            except ValueError:
                raise ApiError(422, f"dims: expected two integers like 0,1, got {dims!r}", "dims") from None
            if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= d < svc.latent_dim for d in pair):
                raise ApiError(422, f"dims: need two different indices in 0..{svc.latent_dim - 1}, "
                                    f"got {dims!r}", "dims")
        def build(cfg: ModelConfig) -> np.ndarray:
            import torch

            if base is not None and len(base) != cfg.latent_dim:
                raise ApiError(422, "center: does not fit the model being swapped in", "center")
            b = torch.tensor(base, dtype=torch.float32) if base is not None else None
            return traversal_latents(cfg.latent_dim, pair, steps, span, base=b).numpy()

        images, version = await svc.run(build)
        return _png_response(png_bytes(grid(images, ncols=steps)), version)

    @app.get("/latent", summary="The latent code a seed draws (what GET /sample decodes)")
    async def latent(
        request: Request,
        seed: Annotated[int, Query(ge=0, le=MAX_SEED)] = 0,
        temperature: Annotated[float, Query(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = 1.0,
        sampler: Annotated[SamplerName, Query(description=sampler_doc)] = "auto",
    ) -> dict[str, Any]:
        only(request, ("seed", "temperature", "sampler"))
        z = svc.latents(svc.model_config, 1, seed, temperature, sampler)[0]
        return {"z": [float(v) for v in z], "seed": seed, "temperature": temperature,
                "sampler": svc.resolve_sampler(sampler), "version": svc.version}

    @app.post("/decode", response_class=Response, responses={200: png},
              summary="Decode one latent vector to a PNG galaxy")
    async def decode(req: Annotated[DecodeRequest, Body()]):
        def build(cfg: ModelConfig) -> np.ndarray:
            if len(req.z) != cfg.latent_dim:
                raise ApiError(422, f"z: a latent vector must have {cfg.latent_dim} values, "
                                    f"got {len(req.z)}", "z")
            return np.asarray(req.z, dtype=np.float32)[None]

        images, version = await svc.run(build)
        return _png_response(png_bytes(images[0]), version)

    @app.get("/", response_class=Response, include_in_schema=False)
    async def explorer_page(request: Request):
        import html
        from starlette.responses import HTMLResponse

        root = request.scope.get("root_path", "") or ""
        page = _explorer_file("index.html").decode().replace("{{BASE}}", html.escape(root + "/"))
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/explorer/{name}", response_class=Response, include_in_schema=False)
    async def explorer_asset(name: str):
        if name not in EXPLORER_FILES:
            raise ApiError(404, f"name: no explorer file {name!r}", "name")
        return Response(_explorer_file(name), media_type=EXPLORER_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/reconstruct", response_class=Response, responses={200: png}, openapi_extra=upload_doc,
              summary="Encode an uploaded image and decode its posterior mean")
    async def reconstruct(
        request: Request,
        crop: Annotated[float | None, Query(gt=0, le=1, allow_inf_nan=False,
                                            description="central fraction kept (default: the training crop)")] = None,
    ):
        only(request, ("crop",))
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            parts = _parse_multipart(body, ctype)
            named = [p for p in parts if p[0] in ("file", "image")] or [p for p in parts if p[1]]
            if not named:
                raise ApiError(422, "file: no file part in the form (send it as 'file')", "file")
            data = named[0][2]
        elif ctype.lower().startswith(("image/", "application/octet-stream")):
            data = body
        elif not body:
            raise ApiError(422, "file: no image uploaded", "file")
        else:
            raise ApiError(415, f"file: send multipart/form-data or an image/* body, not {ctype!r}", "file")
        def build(cfg: ModelConfig) -> np.ndarray:
            try:
                return decode_image(data, cfg.image_size, crop or svc.crop)
            except BadImage as e:
                raise ApiError(422, f"file: not a usable image ({e})", "file") from None

        image = await asyncio.to_thread(build, svc.model_config)  # Pillow off the event loop
        images, version = await svc.run(lambda cfg: image if cfg == svc.model_config else build(cfg),
                                        "reconstruct")
        return _png_response(png_bytes(images[0]), version)

    # Outermost first: the token is checked before the body is read.
    app.add_middleware(_BodyLimitMiddleware, limit=svc.config.max_body_bytes)
    if svc.token is not None:
        app.add_middleware(_AuthMiddleware, token=svc.token)
    return app


# --------------------------------------------------------------------------- application


def default_deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Per-deployment options used unless cluster/serve.yaml (or the caller) overrides them."""
    return {
        INGRESS: {
            "max_ongoing_requests": 64,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
            "ray_actor_options": {"num_cpus": 0.5},
            "max_surge_percent": 100,
        },
        DECODER: {
            # >= max_batch_size or a batch can never fill.
            "max_ongoing_requests": 2 * cfg.max_batch_size,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": cfg.max_batch_size},
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            "max_surge_percent": 100,
        },
    }


def merge_deployment_options(cfg: ServeConfig, overrides: Mapping[str, Mapping[str, Any]] | None
                             ) -> dict[str, dict[str, Any]]:
    """Defaults with ``overrides`` applied per deployment (each key replaces the default's)."""
    options = default_deployment_options(cfg)
    for name, opts in (overrides or {}).items():
        if name not in options:
            raise ConfigError(f"unknown deployment {name!r}; valid names are: {', '.join(DEPLOYMENT_NAMES)}")
        opts = {k: v for k, v in dict(opts).items() if k != "name"}
        if opts.get("num_replicas") not in (None, "auto") and "autoscaling_config" not in opts:
            options[name].pop("autoscaling_config", None)
        if "autoscaling_config" in opts:
            options[name].pop("num_replicas", None)
        options[name].update(opts)
    mor = options[DECODER].get("max_ongoing_requests")
    if isinstance(mor, int) and mor < cfg.max_batch_size:
        raise ConfigError(f"{DECODER}.max_ongoing_requests ({mor}) must be >= max_batch_size "
                          f"({cfg.max_batch_size}), or batches never fill")
    return options


def build_app(config: Mapping[str, Any] | ServeConfig,
              deployment_options: Mapping[str, Mapping[str, Any]] | None = None,
              token: str | None | object = ...) -> serve.Application:
    """The Serve application: ``GalaxyAPI`` (ingress) bound to a ``Decoder``.

    ``token`` defaults to the environment variable named by ``config.token_env`` (read here,
    in the process that builds the app, and handed to the replicas as an init argument);
    pass ``None`` to disable auth, or a string to set it.
    """
    cfg = serve_config(config)
    cfg = dataclasses.replace(cfg, model=_resolve_uri(cfg.model))
    if token is ...:
        token = os.environ.get(cfg.token_env) if cfg.token_env else None
    options = merge_deployment_options(cfg, deployment_options)
    decoder = Decoder.options(**options[DECODER]).bind(cfg)
    return GalaxyAPI.options(**options[INGRESS]).bind(cfg, decoder, _Token(token) if token else None)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``import_path: ray_galaxy.serve:app_builder`` in a Serve config."""
    return build_app(args)


# --------------------------------------------------------------------------- config file checks


def _model_of(annotation: Any) -> Any:
    """The pydantic model class inside an annotation (Optional/Union/List unwrapped), if any."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _strict_keys(value: Any, model: Any, where: str, errors: list[str]) -> None:
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


def check_serve_config(data: Any) -> list[str]:
    """Every problem of a Serve config file (cluster/serve.yaml), ``[]`` when it is good.

    Ray's ``ServeDeploySchema`` ignores unknown keys (forward compatibility), so a typo such
    as ``max_replica`` would silently do nothing. This checks the schema, then every key
    against the schema's fields, the ``args`` against :class:`ServeConfig`, the deployment
    names, and that the decoder's ``max_ongoing_requests`` lets batches fill.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    errors: list[str] = []
    _strict_keys(data, ServeDeploySchema, "<root>", errors)
    for i, app in enumerate(data.get("applications") or []):
        where = f"applications[{i}]"
        if app.get("import_path") != "ray_galaxy.serve:app_builder":
            continue
        try:
            cfg = serve_config(app.get("args") or {})
        except ConfigError as e:
            errors.append(f"{where}.args: {e}")
            continue
        overrides = {}
        for d in app.get("deployments") or []:
            if d.get("name") not in DEPLOYMENT_NAMES:
                errors.append(f"{where}.deployments: unknown deployment {d.get('name')!r}; "
                              f"valid names are: {', '.join(DEPLOYMENT_NAMES)}")
            else:
                overrides[d["name"]] = d
        if errors:
            continue
        try:
            merge_deployment_options(cfg, overrides)
        except ConfigError as e:
            errors.append(f"{where}: {e}")
    return errors


def load_serve_config(path: str, app_name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full config, the chosen application) from a checked Serve config file."""
    from ray_galaxy.config import read_yaml

    data = read_yaml(path)
    problems = check_serve_config(data)
    if problems:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(problems))
    apps = [a for a in data["applications"] if a.get("import_path") == "ray_galaxy.serve:app_builder"]
    if app_name is not None:
        apps = [a for a in apps if a.get("name", "default") == app_name]
    if not apps:
        raise ConfigError(f"{path}: no application with import_path ray_galaxy.serve:app_builder"
                          + (f" named {app_name!r}" if app_name else ""))
    return data, apps[0]

"""The HTTP API's routes (a FastAPI :class:`APIRouter`) and the app of one ingress replica.

Each route validates its input (FastAPI and pydantic, :mod:`ray_galaxy.serve.schemas`; what
depends on the model, such as a latent vector's length, against the model the request names),
builds latent codes or an image with that model's :class:`Generator`, and hands them to
``ServedModel.run``. The routes reach the ingress as ``request.app.state.svc`` and the model a
request names (``model=``, query parameter or JSON field; default: the first) through the
``Svc`` dependency.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at runtime.
import asyncio
import io
import math
import zipfile
from typing import Annotated, Any, Callable

import numpy as np
import torch
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response

from ray_galaxy.config import ModelConfig
from ray_galaxy.data import BadImage, decode_image
from ray_galaxy.generation.latents import slerp, traversal_latents
from ray_galaxy.images import grid, png_bytes
from ray_galaxy.serve.config import MAX_ABS_LATENT, Token
from ray_galaxy.serve.errors import ApiError, install_error_handlers
from ray_galaxy.serve.explorer import EXPLORER_FILES, explorer_file, explorer_page
from ray_galaxy.serve.middleware import add_middleware
from ray_galaxy.serve.schemas import (PNG, SAMPLE_FORMATS, UPLOAD_DOC, CenterQuery, CropQuery, DecodeRequest,
                                      DetailQuery, DimsQuery, InterpolateRequest, LabelQuery, ModelQuery,
                                      RangeQuery, SampleRequest, SamplerQuery, SeedQuery, TemperatureQuery,
                                      TraverseStepsQuery, WhereQuery)

API_DESCRIPTION = ("Galaxy images from a convolutional VAE. Errors are JSON "
                   '`{"error": ..., "field": ...}`. Send `Authorization: Bearer <token>` when '
                   "the server was started with a token (every route but /healthz).")


# The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def``
# dependency in its thread pool, two thread hand-offs per request for a dict lookup
# (docs/benchmarks-history.md, single-galaxy requests).
async def _service(request: Request, model: ModelQuery = None) -> Any:
    """The model (``ray_galaxy.serve.served.ServedModel``) that ``?model=`` names, else the
    default; 422 listing the valid names for an unknown one."""
    request.state.model_query = model
    return request.app.state.svc.pick(model)


async def _api(request: Request) -> Any:
    """The ingress replica (``ray_galaxy.serve.ingress.GalaxyAPI``) that serves this app."""
    return request.app.state.svc


def _query_names(dependant: Any) -> list[str]:
    """The query parameters of a route and of its dependencies (``model`` comes from ``Svc``)."""
    return [p.alias for p in dependant.query_params] + [n for d in dependant.dependencies for n in _query_names(d)]


async def _known_query(request: Request) -> None:
    """422 naming a query parameter the route does not take (a typo would else be ignored)."""
    allowed = _query_names(request.scope["route"].dependant)
    for key in request.query_params:
        if key not in allowed:
            raise ApiError(422, f"{key}: unknown query parameter; valid ones are: "
                                f"{', '.join(allowed) or '(none)'}", key)


Svc = Annotated[Any, Depends(_service)]
Api = Annotated[Any, Depends(_api)]
KNOWN_QUERY = [Depends(_known_query)]
router = APIRouter()


def _png(image: np.ndarray, version: str) -> Response:
    return Response(png_bytes(image), media_type="image/png", headers={"X-Model-Version": version})


def _attachment(data: bytes, media_type: str, filename: str, version: str) -> Response:
    return Response(data, media_type=media_type, headers={
        "X-Model-Version": version, "Content-Disposition": f'attachment; filename="{filename}"'})


def _zip_of_pngs(images: np.ndarray) -> bytes:
    """One PNG per image, stored (PNG is compressed already) with a fixed date: same bytes each time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, img in enumerate(images):
            zf.writestr(zipfile.ZipInfo(f"galaxy_{i:02d}.png", date_time=(1980, 1, 1, 0, 0, 0)), png_bytes(img))
    return buf.getvalue()


def _body_model(request: Request, svc: Any, name: str | None) -> Any:
    """The model of a JSON request: its ``model`` field, else ``?model=`` (``svc``); 422 when
    the two name different models."""
    if name is None:
        return svc
    query = request.state.model_query
    if query is not None and query != name:
        raise ApiError(422, f"model: the body names {name!r} and the query {query!r}; give one", "model")
    return request.app.state.svc.pick(name)


def endpoint_latent(cfg: ModelConfig, value: int | list[float], field: str,
                    draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """An interpolation endpoint: a seed's code (``draw(seed)``), or a latent vector of the right length."""
    if isinstance(value, int):
        return draw(value)
    if len(value) != cfg.latent_dim:
        raise ApiError(422, f"{field}: a latent vector must have {cfg.latent_dim} values, "
                            f"got {len(value)}", field)
    return np.asarray(value, dtype=np.float32)


def _parse_center(center: str, latent_dim: int) -> list[float]:
    try:
        base = [float(v) for v in center.split(",")]
    except ValueError:
        raise ApiError(422, "center: expected comma-separated numbers", "center") from None
    if len(base) != latent_dim:
        raise ApiError(422, f"center: a latent vector must have {latent_dim} values, got {len(base)}", "center")
    if not all(math.isfinite(v) and abs(v) <= MAX_ABS_LATENT for v in base):
        raise ApiError(422, f"center: values must be finite and within +-{MAX_ABS_LATENT:g}", "center")
    return base


def _parse_dims(dims: str | None, svc: Any) -> tuple[int, int]:
    if dims is None:
        if svc.traverse_dims is None:
            raise ApiError(422, "dims: this model has a single latent dimension", "dims")
        return svc.traverse_dims
    try:
        pair = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise ApiError(422, f"dims: expected two integers like 0,1, got {dims!r}", "dims") from None
    if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= d < svc.latent_dim for d in pair):
        raise ApiError(422, f"dims: need two different indices in 0..{svc.latent_dim - 1}, got {dims!r}", "dims")
    return pair


async def _upload_bytes(request: Request) -> bytes:
    """The uploaded image: the ``file`` (or ``image``, else any named) file of a multipart form
    (parsed by python-multipart), or a bare ``image/*`` body."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        try:
            async with request.form() as form:
                files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
                named = [f for k, f in files if k in ("file", "image")] or [f for _, f in files if f.filename]
                if not named:
                    raise ApiError(422, "file: no file part in the form (send it as 'file')", "file")
                return await named[0].read()
        except StarletteHTTPException as e:  # python-multipart could not parse the form
            raise ApiError(400, f"file: malformed multipart body ({e.detail})", "file") from None
    body = await request.body()
    if ctype.startswith(("image/", "application/octet-stream")):
        return body
    if not body:
        raise ApiError(422, "file: no image uploaded", "file")
    raise ApiError(415, f"file: send multipart/form-data or an image/* body, not {ctype!r}", "file")


# --------------------------------------------------------------------------- routes


@router.get("/healthz", summary="Liveness (never needs the token)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/info", summary="Model, version, training metrics and serving settings", dependencies=KNOWN_QUERY)
async def info(svc: Svc) -> dict[str, Any]:
    return svc.info()


@router.get("/models", summary="The models this endpoint serves (model=NAME picks one), and the ones a "
                               "decoder replica holds now", dependencies=KNOWN_QUERY)
async def models(api: Api) -> dict[str, Any]:
    return await api.listing()


@router.get("/sample", response_class=Response, responses={200: PNG}, dependencies=KNOWN_QUERY,
            summary="One galaxy from the prior or sampler, of any class or one "
                    "(same seed + model: byte-identical PNG)")
async def sample_one(svc: Svc, seed: SeedQuery = 0, temperature: TemperatureQuery = 1.0,
                     sampler: SamplerQuery = "auto", detail: DetailQuery = True,
                     label: LabelQuery = None, where: WhereQuery = None) -> Response:
    images, version = await svc.run(lambda cfg: svc.latents(cfg, 1, seed, temperature, sampler, label, where),
                                    detail_seed=lambda cfg: svc.detail_seed(cfg, sampler, detail, seed))
    return _png(images[0], version)


@router.post("/sample", response_class=Response, responses={200: SAMPLE_FORMATS},
             summary="n galaxies as a PNG grid, a zip of PNGs, or a .npy array")
async def sample_many(svc: Svc, request: Request, req: Annotated[SampleRequest, Body()]) -> Response:
    svc = _body_model(request, svc, req.model)
    images, version = await svc.run(
        lambda cfg: svc.latents(cfg, req.n, req.seed, req.temperature, req.sampler, req.label, req.where),
        detail_seed=lambda cfg: svc.detail_seed(cfg, req.sampler, req.detail, req.seed))
    if req.format == "grid":
        return _png(grid(images), version)
    if req.format == "npy":
        buf = io.BytesIO()
        np.save(buf, images, allow_pickle=False)
        return _attachment(buf.getvalue(), "application/octet-stream", f"galaxies-seed{req.seed}.npy", version)
    return _attachment(_zip_of_pngs(images), "application/zip", f"galaxies-seed{req.seed}.zip", version)


@router.post("/interpolate", response_class=Response, responses={200: PNG},
             summary="A strip of galaxies along the spherical path (slerp) between two codes")
async def interpolate(svc: Svc, request: Request, req: Annotated[InterpolateRequest, Body()]) -> Response:
    svc = _body_model(request, svc, req.model)

    def build(cfg: ModelConfig) -> np.ndarray:
        def draw(seed: int) -> np.ndarray:
            return svc.latents(cfg, 1, seed, req.temperature, req.sampler, req.label)[0]

        z0, z1 = (endpoint_latent(cfg, v, f, draw) for v, f in ((req.from_, "from"), (req.to, "to")))
        return slerp(z0, z1, req.steps).numpy()

    images, version = await svc.run(build)
    return _png(grid(images, ncols=req.steps), version)


@router.get("/traverse", response_class=Response, responses={200: PNG}, dependencies=KNOWN_QUERY,
            summary="Two latent dims swept over rows and columns, the others at 0")
async def traverse(svc: Svc, dims: DimsQuery = None, steps: TraverseStepsQuery = 8,
                   span: RangeQuery = 3.0, center: CenterQuery = None) -> Response:
    base = _parse_center(center, svc.latent_dim) if center is not None else None
    pair = _parse_dims(dims, svc)

    def build(cfg: ModelConfig) -> np.ndarray:
        if base is not None and len(base) != cfg.latent_dim:
            raise ApiError(422, "center: does not fit the model being swapped in", "center")
        b = torch.tensor(base, dtype=torch.float32) if base is not None else torch.zeros(cfg.latent_dim)
        return traversal_latents(b, pair, steps, span).numpy()

    images, version = await svc.run(build)
    return _png(grid(images, ncols=steps), version)


@router.get("/latent", summary="The latent code a seed draws (what GET /sample decodes)", dependencies=KNOWN_QUERY)
async def latent(svc: Svc, seed: SeedQuery = 0, temperature: TemperatureQuery = 1.0,
                 sampler: SamplerQuery = "auto", label: LabelQuery = None, where: WhereQuery = None) -> dict[str, Any]:
    z = svc.latents(svc.model_config, 1, seed, temperature, sampler, label, where)[0]
    return {"z": [float(v) for v in z], "seed": seed, "temperature": temperature,
            "sampler": svc.gen.resolve(sampler), "label": label, "where": where, "version": svc.version}


@router.post("/decode", response_class=Response, responses={200: PNG},
             summary="Decode one latent vector to a PNG galaxy")
async def decode(svc: Svc, request: Request, req: Annotated[DecodeRequest, Body()]) -> Response:
    svc = _body_model(request, svc, req.model)

    def build(cfg: ModelConfig) -> np.ndarray:
        if len(req.z) != cfg.latent_dim:
            raise ApiError(422, f"z: a latent vector must have {cfg.latent_dim} values, got {len(req.z)}", "z")
        return np.asarray(req.z, dtype=np.float32)[None]

    images, version = await svc.run(build)
    return _png(images[0], version)


@router.get("/", response_class=Response, include_in_schema=False)
async def explorer(request: Request) -> Response:
    page = explorer_page(request.scope.get("root_path", "") or "")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/explorer/{name}", response_class=Response, include_in_schema=False)
async def explorer_asset(name: str) -> Response:
    if name not in EXPLORER_FILES:
        raise ApiError(404, f"name: no explorer file {name!r}", "name")
    return Response(explorer_file(name), media_type=EXPLORER_FILES[name], headers={"Cache-Control": "no-cache"})


@router.post("/reconstruct", response_class=Response, responses={200: PNG}, openapi_extra=UPLOAD_DOC,
             dependencies=KNOWN_QUERY, summary="Encode an uploaded image and decode its posterior mean")
async def reconstruct(svc: Svc, request: Request, crop: CropQuery = None) -> Response:
    data = await _upload_bytes(request)

    def build(cfg: ModelConfig) -> np.ndarray:
        try:
            return decode_image(data, cfg.image_size, crop or svc.crop)
        except BadImage as e:
            raise ApiError(422, f"file: not a usable image ({e})", "file") from None

    image = await asyncio.to_thread(build, svc.model_config)  # Pillow off the event loop
    images, version = await svc.run(lambda cfg: image if cfg == svc.model_config else build(cfg), "reconstruct")
    return _png(images[0], version)


def build_api(svc: Any, token: Token | None, max_body_bytes: int) -> FastAPI:
    """The FastAPI app of one ingress replica ``svc`` (a ``GalaxyAPI``)."""
    app = FastAPI(title="ray-galaxy", version="1", description=API_DESCRIPTION)
    app.state.svc = svc
    app.include_router(router)
    install_error_handlers(app)
    add_middleware(app, token, max_body_bytes)
    return app

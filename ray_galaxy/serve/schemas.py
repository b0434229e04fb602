"""What the HTTP API accepts: the JSON bodies (pydantic models) and the query parameter types,
with the limits of :mod:`ray_galaxy.serve.config`. FastAPI validates requests against these and
publishes them in the OpenAPI schema (/docs)."""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at runtime.
from typing import Annotated, Literal, Union

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ray_galaxy.serve.config import (MAX_ABS_LATENT, MAX_INTERP_STEPS, MAX_LABEL_CHARS, MAX_MODEL_CHARS, MAX_N,
                                     MAX_SEED, MAX_TEMPERATURE, MAX_TRAVERSE_RANGE, MAX_TRAVERSE_STEPS)

SAMPLER_DOC = ("prior: N(0, T^2 I); gmm: the model's two-stage sampler (see /info samplers); "
               "auto (default): gmm when the model has one, else prior")
DETAIL_DOC = ("with the gmm sampler: draw from p(x|z), the decoded mean plus the sampler's residual "
              "detail (seeded by seed); false: the decoder's mean")
MODEL_DOC = "the model, by name (one of /models); default: the first the endpoint serves"
LABEL_DOC = ("only galaxies of this class (one of /info labels; needs a sampler fitted with labels); "
             "default: any class")
WHERE_DOC = ("only from training galaxies whose properties satisfy this, e.g. 'r50_px >= 6 and ellipticity > 0.5' "
             "(comparisons with numbers joined by and/or; /info properties lists them with their ranges); "
             "default: any")

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
LatentValue = Annotated[float, Field(ge=-MAX_ABS_LATENT, le=MAX_ABS_LATENT, allow_inf_nan=False)]
Endpoint = Union[Seed, list[LatentValue]]
SamplerName = Literal["auto", "prior", "gmm"]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)]

# Query parameters.
SeedQuery = Annotated[int, Query(ge=0, le=MAX_SEED)]
TemperatureQuery = Annotated[float, Query(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
SamplerQuery = Annotated[SamplerName, Query(description=SAMPLER_DOC)]
DetailQuery = Annotated[bool, Query(description=DETAIL_DOC)]
ModelQuery = Annotated[str | None, Query(min_length=1, max_length=MAX_MODEL_CHARS, description=MODEL_DOC)]
LabelQuery = Annotated[str | None, Query(min_length=1, max_length=MAX_LABEL_CHARS, description=LABEL_DOC)]
# No length limits here: the where parser names what is wrong (empty, too long) in its own words.
WhereQuery = Annotated[str | None, Query(description=WHERE_DOC)]
DimsQuery = Annotated[str | None, Query(description="two latent indices, e.g. 0,1 "
                                                    "(default: the training run's traversal dims)")]
TraverseStepsQuery = Annotated[int, Query(ge=2, le=MAX_TRAVERSE_STEPS)]
RangeQuery = Annotated[float, Query(alias="range", gt=0, le=MAX_TRAVERSE_RANGE, allow_inf_nan=False,
                                    description="values run from -range to +range")]
CenterQuery = Annotated[str | None, Query(description="comma-separated latent vector for the other "
                                                      "dims (default: all 0)")]
CropQuery = Annotated[float | None, Query(gt=0, le=1, allow_inf_nan=False,
                                          description="central fraction kept (default: the training crop)")]


class SampleRequest(BaseModel):
    """POST /sample."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(16, ge=1, le=MAX_N, description="number of galaxies")
    seed: Seed = Field(0, description="the same seed and model give the same images")
    temperature: Temperature = Field(1.0, description="scale of the prior N(0, T^2 I)")
    format: Literal["grid", "zip", "npy"] = Field(
        "grid", description="grid: one PNG mosaic; zip: one PNG per galaxy; npy: (n, S, S, 3) uint8")
    sampler: SamplerName = Field("auto", description=SAMPLER_DOC)
    detail: bool = Field(True, description=DETAIL_DOC)
    label: Label | None = Field(None, description=LABEL_DOC)
    where: str | None = Field(None, description=WHERE_DOC)
    model: ModelName | None = Field(None, description=MODEL_DOC)


class InterpolateRequest(BaseModel):
    """POST /interpolate."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: Endpoint = Field(..., alias="from", description="a seed, or a latent vector")
    to: Endpoint = Field(..., description="a seed, or a latent vector")
    steps: int = Field(8, ge=2, le=MAX_INTERP_STEPS)
    temperature: Temperature = Field(1.0, description="prior scale for seed endpoints")
    sampler: SamplerName = Field("auto", description="sampler of seed endpoints: " + SAMPLER_DOC)
    label: Label | None = Field(None, description="class of seed endpoints: " + LABEL_DOC)
    model: ModelName | None = Field(None, description=MODEL_DOC)


class DecodeRequest(BaseModel):
    """POST /decode."""

    model_config = ConfigDict(extra="forbid")
    z: list[LatentValue] = Field(..., description="one latent vector (latent_dim values)")
    model: ModelName | None = Field(None, description=MODEL_DOC)


PNG = {"content": {"image/png": {}}, "description": "PNG image"}
SAMPLE_FORMATS = {"content": {"image/png": {}, "application/zip": {}, "application/octet-stream": {}}}
# /reconstruct reads its body itself (a form or a bare image), so its schema is spelled out.
UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

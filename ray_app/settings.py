"""One typed settings object, read once from the environment (prefix ``RAY_APP_``).

TotalSegmentator's own variables (``TOTALSEG_HOME_DIR``, ``TOTALSEG_WEIGHTS_PATH``) are deliberately not
mirrored here: TotalSegmentator reads them itself, and a second copy could disagree with it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAY_APP_", frozen=True, extra="ignore")

    # Segmentation
    device: Literal["cpu", "cuda"] = "cpu"
    fast: bool = True
    num_threads: int | None = Field(
        default=None, description="Torch threads per segmenter; default: the CPUs this process may use."
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="CPU forward precision; bf16 is faster on CPUs with AVX-512 BF16/AMX but not "
        "bit-identical to vanilla (on CUDA nnU-Net's own fp16 autocast applies either way).",
    )
    crop_to_body: bool = Field(
        default=False,
        description="Tile only the body's bounding box (HU > -500): fewer tiles over air; changes "
        "nnU-Net's tile grid, so masks may differ from vanilla at a few voxels.",
    )
    download_weights: bool = Field(
        default=True, description="Let TotalSegmentator download missing weights (off for air-gapped nodes)."
    )

    # Input validation (checked before any heavy work)
    max_voxels: int = Field(default=512 * 512 * 2000, description="Refuse scans with more voxels (from the header).")
    max_input_bytes: int = Field(default=2 * 1024**3, description="Refuse compressed inputs larger than this.")
    min_spacing_mm: float = 0.05
    max_spacing_mm: float = 30.0
    modality_policy: Literal["refuse", "flag"] = Field(
        default="refuse", description="What to do with non-CT modality or intensities that cannot be HU."
    )

    # Passport
    presence_threshold_ml: float = Field(
        default=0.5, description="A structure is present when its segmented volume exceeds this (ml)."
    )

    # AWS (boto3 also honours AWS_ENDPOINT_URL / AWS_REGION on its own)
    aws_endpoint_url: str | None = None
    aws_region: str | None = Field(
        default=None,
        description="Overrides boto3's own region chain (AWS_REGION, AWS_DEFAULT_REGION, the profile); "
        "see ray_app.storage.aws_region.",
    )
    s3_sse: Literal["AES256", "aws:kms"] = "AES256"

    # Serve
    api_token: SecretStr | None = None
    api_token_file: str | None = Field(
        default=None, description="File holding the bearer token (a mounted secret); used when api_token is unset."
    )
    allowed_uri_prefixes: list[str] = Field(default_factory=list)
    max_body_bytes: int = 512 * 1024**2
    output_prefix: str | None = Field(
        default=None, description="Where Serve's `persist` writes masks and passports (s3://bucket/prefix or a folder)."
    )
    passport_store: str | None = Field(
        default=None, description="dynamodb://TABLE or sqlite:///PATH for `persist` and GET /v1/passports."
    )
    serve_min_replicas: int = Field(default=1, ge=0, description="0 scales to zero (cold start: replica + model).")
    serve_max_replicas: int = Field(default=2, ge=1)
    serve_target_ongoing_requests: float = Field(default=1.0, gt=0)
    serve_max_ongoing_requests: int = Field(default=2, ge=1, description="Requests inside one replica at once.")
    serve_max_queued_requests: int = Field(
        default=8, ge=-1, description="Requests waiting for a replica per proxy; beyond it: 503 + Retry-After."
    )
    serve_retry_after_s: int = Field(default=10, ge=0)
    serve_cpus_per_replica: float = Field(default=1.0, ge=0)
    serve_gpus_per_replica: float = Field(
        default=0.0, ge=0, description="GPUs per replica; 0: one when device is cuda."
    )
    serve_extra_models: int = Field(
        default=1, ge=0, description="Models besides the default one (other mode / roi_subset) a replica keeps loaded."
    )
    serve_model_wait_s: float = Field(default=600.0, gt=0, description="How long a request waits for a model load.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, parsed once."""
    return Settings()

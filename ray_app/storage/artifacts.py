"""Per-scan artifact files under the result layout ``{output_prefix}/{scan_id}/{model_key}/{name}`` (see
:mod:`ray_app.storage.keys`), locally or on S3 with server-side encryption; each object is written atomically."""

from __future__ import annotations

from ray_app import storage
from ray_app.storage.keys import result_uri, scan_file_uri

CONTENT_TYPES = {
    ".nii.gz": "application/gzip",
    ".json": "application/json",
    ".png": "image/png",
    ".dcm": "application/dicom",
    ".parquet": "application/vnd.apache.parquet",
}


#: Objects larger than this are the ones the bucket's lifecycle rule moves to Glacier Instant Retrieval
#: (``ray_app.ops.aws_setup.lifecycle_rule``): Glacier IR bills every object as at least 128 KiB, so small
#: passports and previews stay in Standard. The job summary counts the bytes written above and below it.
LARGE_OBJECT_BYTES = 128 * 1024


class ArtifactSink:
    """Writes one scan's files under the result layout; each object is written atomically."""

    def __init__(self, output_prefix: str, *, per_model: bool = True):
        """``per_model=False`` drops the model level (``{prefix}/{scan_id}/{name}``), as ``ray-app segment`` writes."""
        storage.parse_uri(output_prefix)
        self.output_prefix = output_prefix
        self.per_model = per_model

    def uri_for(self, scan_id: str, model_key: str, name: str) -> str:
        if self.per_model:
            return result_uri(self.output_prefix, scan_id, model_key, name)
        return scan_file_uri(self.output_prefix, scan_id, name)

    def put(self, scan_id: str, model_key: str, name: str, data: bytes, content_type: str | None = None) -> str:
        """Write ``data`` as ``name`` for this scan and model; returns the object's URI."""
        uri = self.uri_for(scan_id, model_key, name)
        if content_type is None:
            content_type = next((ct for ext, ct in CONTENT_TYPES.items() if name.endswith(ext)), None)
        return storage.write_bytes(uri, data, content_type)

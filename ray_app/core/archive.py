"""Zip archives of DICOM series, opened in memory and checked before anything is decompressed: member paths
(absolute or ``..``), member count, declared size against the input limit and the compression ratio (bombs)."""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import PurePosixPath

from ray_app.core.errors import DecompressionBomb, EmptyScan, UnreadableScan, UnsafeArchivePath
from ray_app.settings import Settings

#: A zip whose declared content is this many times its compressed size (and above ZIP_RATIO_MIN_BYTES) is a bomb.
ZIP_MAX_RATIO = 100
ZIP_RATIO_MIN_BYTES = 16 * 1024**2
#: More members than any DICOM series has slices; bounds the work of listing a hostile archive.
ZIP_MAX_MEMBERS = 50_000


def unzip(data: bytes, scan_id: str, settings: Settings) -> list[bytes]:
    """Members of a zip, in memory; paths and declared sizes are checked before anything is decompressed."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise UnreadableScan(f"not a readable zip archive ({exc})", scan_id=scan_id) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_MEMBERS:
            raise DecompressionBomb(f"the archive has {len(infos)} members", scan_id=scan_id)
        for info in infos:
            if _unsafe_member(info.filename):
                raise UnsafeArchivePath("the archive has a member with an absolute or '..' path", scan_id=scan_id)
        files = [i for i in infos if not i.is_dir()]
        declared = sum(i.file_size for i in files)
        compressed = sum(i.compress_size for i in files)
        if declared > settings.max_input_bytes:
            raise DecompressionBomb(
                f"the archive declares {declared} bytes of content, more than the allowed {settings.max_input_bytes}",
                scan_id=scan_id,
            )
        if declared > ZIP_RATIO_MIN_BYTES and declared > ZIP_MAX_RATIO * max(compressed, 1):
            raise DecompressionBomb(
                f"the archive expands {declared / max(compressed, 1):.0f}-fold (limit {ZIP_MAX_RATIO})",
                scan_id=scan_id,
            )
        blobs = []
        for info in files:
            name = PurePosixPath(info.filename).name
            if name.startswith(".") or info.filename.startswith("__MACOSX/"):
                continue
            try:
                with zf.open(info) as member:
                    blob = member.read(info.file_size + 1)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
                raise UnreadableScan(f"a zip member cannot be extracted ({exc})", scan_id=scan_id) from exc
            if len(blob) != info.file_size:
                raise DecompressionBomb("a zip member's size differs from what the archive declares", scan_id=scan_id)
            blobs.append(blob)
    if not blobs:
        raise EmptyScan("the archive holds no files", scan_id=scan_id)
    return blobs


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return norm.startswith("/") or bool(re.match(r"^[A-Za-z]:", norm)) or ".." in PurePosixPath(norm).parts

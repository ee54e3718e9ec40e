"""Inputs for the offline demo: phantom CTs on varied grids, and one corrupt file to show failure handling."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from ray_app.demo.phantom import make_phantom

#: The demo's deliberately corrupt input and the failure it must end in.
CORRUPT_ID = "truncated"
CORRUPT_CODE = "truncated_file"


def make_demo_inputs(folder: Path, count: int = 4) -> Path:
    """Write ``count`` phantom scans (RAS and LPS, 1.5-3 mm) plus a truncated one; return the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        spacing = (1.5 + 0.5 * (i % 3), 1.5 + 0.5 * (i % 3), 3.0)
        affine = np.diag([*spacing, 1.0])
        if i % 2:
            affine[:2] *= -1  # LPS, as DICOM converters write
        affine[:3, 3] = [-190.0 * np.sign(affine[0, 0]), -140.0 * np.sign(affine[1, 1]), -190.0]
        ct, _ = make_phantom(1000 + i, affine=affine)
        path = folder / f"phantom-{i + 1:02d}.nii.gz"
        nib.save(ct, path)
        rows.append({"scan_id": path.name.removesuffix(".nii.gz"), "uri": str(path)})
    corrupt = folder / "truncated.nii.gz"
    data = Path(rows[0]["uri"]).read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    rows.append({"scan_id": CORRUPT_ID, "uri": str(corrupt)})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["scan_id", "uri"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest

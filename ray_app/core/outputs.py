"""What a segmented scan produces besides its passport: the multilabel mask as NIfTI, optionally one mask per
structure (``segmentations.zip``), a DICOM-SEG for DICOM input (highdicom) and a PNG preview (matplotlib, Agg).

Everything returns bytes; where they are written is the caller's business (``ray_app.storage``).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ray_app.core.errors import DicomSegUnavailable
from ray_app.core.scan import Scan

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.sr.codedict import Concepts

#: Preview figure size in inches at PREVIEW_DPI: a 1500x600 pixel PNG.
PREVIEW_SIZE_IN = (15.0, 6.0)
PREVIEW_DPI = 100
#: CT soft-tissue window (W 400, L 40) for the preview background.
PREVIEW_WINDOW_HU = (-160.0, 240.0)
PREVIEW_LEGEND_ITEMS = 12


def mask_to_nifti_bytes(mask: np.ndarray | nib.Nifti1Image, scan: Scan, *, compresslevel: int = 6) -> bytes:
    """The multilabel mask as ``.nii.gz`` on the scan's exact grid: its header and affine, dtype uint8."""
    data = _mask_array(mask, scan)
    header = scan.image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, float(data.max(initial=0))
    img = type(scan.image)(data, scan.affine, header)
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def per_structure_masks(
    mask: np.ndarray,
    scan: Scan,
    label_map: Mapping[int, str],
    *,
    names: Iterable[str] | None = None,
    include_empty: bool = False,
    compresslevel: int = 1,
) -> dict[str, bytes]:
    """One binary ``.nii.gz`` per structure (TotalSegmentator's non-``--ml`` layout), keyed by structure name.

    Empty structures are skipped unless ``include_empty``; ``names`` restricts the output to some structures.
    """
    data = _mask_array(mask, scan)
    wanted = set(names) if names is not None else None
    counts = np.bincount(data.reshape(-1), minlength=max(label_map, default=0) + 1)
    header = scan.image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    out = {}
    for label_id, name in sorted(label_map.items()):
        if wanted is not None and name not in wanted:
            continue
        if not include_empty and counts[label_id] == 0:
            continue
        binary = (data == label_id).astype(np.uint8)
        img = type(scan.image)(binary, scan.affine, header)
        out[name] = gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)
    return out


#: Name of the per-structure archive next to ``mask.nii.gz`` (one ``<structure>.nii.gz`` per structure inside).
SEGMENTATIONS_ZIP = "segmentations.zip"


def per_structure_zip(mask: np.ndarray, scan: Scan, label_map: Mapping[int, str]) -> bytes:
    """TotalSegmentator's default output (one binary ``<structure>.nii.gz`` per class, on the scan's grid) as one
    zip archive: a file for every structure with at least one voxel in the mask. Members are already gzipped, so
    they are stored, and their timestamps are fixed: the same mask always gives the same bytes."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in per_structure_masks(mask, scan, label_map).items():
            archive.writestr(zipfile.ZipInfo(f"{name}.nii.gz", date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def dicom_seg_bytes(
    scan: Scan,
    mask: np.ndarray | nib.Nifti1Image,
    label_map: Mapping[int, str],
    *,
    model: Mapping[str, Any] | None = None,
    series_number: int = 300,
) -> bytes:
    """A DICOM Segmentation (highdicom, BINARY) that references the source series, one segment per structure
    present in the mask, labelled with its TotalSegmentator name and coded with TotalSegmentator's own SNOMED CT
    mapping (generic "Anatomical structure" codes for names it lacks).

    Raises :class:`DicomSegUnavailable` when the scan was not read from DICOM or its source lacks the UIDs a
    SEG must reference.
    """
    import highdicom as hd

    sources = _check_dicom_source(scan)
    data = _mask_array(mask, scan)
    present, frames = _segment_frames(scan, data, label_map)
    model = dict(model or {})
    versions = model.get("versions") or {}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="TotalSegmentator",
        version=str(versions.get("totalsegmentator") or _version("totalsegmentator")),
        family=_codes().DCM.ArtificialIntelligence,
        parameters={k: str(model[k]) for k in ("task", "mode", "checksum") if model.get(k)} or None,
    )
    descriptions = [_segment_description(number, name, algorithm) for number, (_, name) in enumerate(present, 1)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ray_app",
        manufacturer_model_name="TotalSegmentator",
        software_versions=str(versions.get("ray_app") or _version("ray_app")),
        device_serial_number="0",
        series_description=f"TotalSegmentator {model.get('task', '')}".strip(),
    )
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _check_dicom_source(scan: Scan) -> list[Any]:
    """The source series a SEG references; refused for a scan not read from DICOM, or one without the UIDs."""
    if not scan.dicom:
        raise DicomSegUnavailable(
            "a DICOM-SEG needs DICOM input; this scan was not read from DICOM", scan_id=scan.scan_id
        )
    missing = [
        kw
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
        if any(not ds.get(kw) for ds in scan.dicom)
    ]
    if missing:
        raise DicomSegUnavailable(
            f"the source DICOM lacks {', '.join(missing)}; a DICOM-SEG could not reference it", scan_id=scan.scan_id
        )
    return scan.dicom


def _segment_frames(
    scan: Scan, data: np.ndarray, label_map: Mapping[int, str]
) -> tuple[list[tuple[int, str]], np.ndarray]:
    """The structures present (label id, name) and the mask as highdicom's frames, labels renumbered 1..N."""
    counts = np.bincount(data.reshape(-1), minlength=max(label_map, default=0) + 1)
    present = [(label_id, name) for label_id, name in sorted(label_map.items()) if counts[label_id] > 0]
    if not present:
        raise DicomSegUnavailable("the mask is empty: a DICOM-SEG needs at least one segment", scan_id=scan.scan_id)

    # Segment numbers must be 1..N: remap label ids through a lookup table, one pass over the volume.
    lut = np.zeros(max(int(data.max()), max(label_map)) + 1, dtype=np.uint8)
    for number, (label_id, _) in enumerate(present, start=1):
        lut[label_id] = number
    # scan.image[:, :, k] is scan.dicom[k] with axes (column, row); highdicom wants (frame, row, column).
    frames = np.ascontiguousarray(lut[data].transpose(2, 1, 0))
    return present, frames


def preview_png(scan: Scan, mask: np.ndarray | nib.Nifti1Image, label_map: Mapping[int, str]) -> bytes:
    """Axial, coronal and sagittal slices through the segmented region with the mask overlaid, and a legend of
    the largest structures. Always PREVIEW_SIZE_IN x PREVIEW_DPI pixels (1500x600), whatever the scan."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = _mask_array(mask, scan)
    ornt = nib.orientations.io_orientation(scan.affine)
    ct = nib.orientations.apply_orientation(np.asanyarray(scan.image.dataobj), ornt)  # views: RAS-ordered axes
    labels = nib.orientations.apply_orientation(data, ornt)
    zooms = np.abs(nib.affines.voxel_sizes(scan.affine))[ornt[:, 0].astype(int)]
    counts = np.bincount(labels.reshape(-1), minlength=max(label_map, default=0) + 1)
    colors = np.zeros((len(counts), 4))
    for label_id, name in label_map.items():
        colors[label_id] = (*_label_rgb(label_id, name), 1.0)
    centre = _overlay_centre(labels)

    fig = Figure(figsize=PREVIEW_SIZE_IN, dpi=PREVIEW_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.8]})
    views = (
        ("axial", ct[:, :, centre[2]], labels[:, :, centre[2]], zooms[1] / zooms[0]),
        ("coronal", ct[:, centre[1], :], labels[:, centre[1], :], zooms[2] / zooms[0]),
        ("sagittal", ct[centre[0], :, :], labels[centre[0], :, :], zooms[2] / zooms[1]),
    )
    for ax, view in zip(axes[:3], views):
        _draw_view(ax, view, colors)
    _draw_legend(axes[3], counts, colors, label_map, float(np.prod(scan.spacing)) / 1000.0)
    fig.suptitle(f"scan {scan.scan_id}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PREVIEW_DPI)
    return buf.getvalue()


def _draw_view(ax: Any, view: tuple[str, np.ndarray, np.ndarray, float], colors: np.ndarray) -> None:
    """One slice of the CT in the preview's window with the labels over it, in the radiological convention."""
    from matplotlib.colors import ListedColormap

    title, ct_slice, label_slice, aspect = view
    # RAS-ordered slices: transpose and flip both ways for the radiological convention (patient's right on
    # the viewer's left, anterior on top in axial, superior on top and anterior on the left in sagittal).
    image = np.flipud(np.fliplr(np.asarray(ct_slice, dtype=np.float32).T))
    overlay = np.flipud(np.fliplr(np.asarray(label_slice).T))
    ax.imshow(
        image, cmap="gray", vmin=PREVIEW_WINDOW_HU[0], vmax=PREVIEW_WINDOW_HU[1], aspect=aspect, interpolation="nearest"
    )
    ax.imshow(
        np.ma.masked_equal(overlay, 0),
        cmap=ListedColormap(colors),
        vmin=-0.5,
        vmax=len(colors) - 0.5,
        alpha=0.45,
        aspect=aspect,
        interpolation="nearest",
    )
    ax.set_title(title)
    ax.set_axis_off()


def _draw_legend(
    ax: Any, counts: np.ndarray, colors: np.ndarray, label_map: Mapping[int, str], voxel_ml: float
) -> None:
    """The largest structures with their volumes, or a note that nothing was segmented."""
    from matplotlib.patches import Patch

    ax.set_axis_off()
    ranked = [int(i) for i in np.argsort(-counts, kind="stable") if i and counts[i] and int(i) in label_map]
    largest = ranked[:PREVIEW_LEGEND_ITEMS]
    handles = [Patch(color=colors[i][:3], label=f"{label_map[i]} ({counts[i] * voxel_ml:.0f} ml)") for i in largest]
    if handles:
        ax.legend(handles=handles, loc="center left", frameon=False, fontsize=9, title="largest structures")
    else:
        ax.text(0.0, 0.5, "no structures segmented", va="center")


def _mask_array(mask: np.ndarray | nib.Nifti1Image, scan: Scan) -> np.ndarray:
    data = np.asanyarray(mask.dataobj) if isinstance(mask, nib.Nifti1Image) else np.asanyarray(mask)
    if data.shape != scan.shape:
        raise ValueError(f"mask shape {data.shape} differs from the scan's {scan.shape}")
    if data.dtype.kind not in "iub":
        raise ValueError(f"mask must hold integer label ids, not {data.dtype}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError("mask label ids must fit in uint8 (0-255)")
        data = data.astype(np.uint8)
    return data


def _overlay_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Slice indices through the middle of the segmented region (the volume's middle when nothing is)."""
    from scipy import ndimage

    box = ndimage.find_objects((labels != 0).astype(np.uint8))
    if not box or box[0] is None:
        return tuple(s // 2 for s in labels.shape)
    return tuple((s.start + s.stop - 1) // 2 for s in box[0])


def _label_rgb(label_id: int, name: str) -> tuple[float, float, float]:
    """TotalSegmentator's own display colour for the structure, else a fixed colour from a qualitative map."""
    rgb = _ts_colors().get(name)
    if rgb is not None:
        return rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab20"](label_id % 20)  # one colour: an RGBA tuple
    return r, g, b


#: TotalSegmentator's display colours: structure name -> (R, G, B), 0-255.
_TS_COLORS: dict[str, tuple[int, int, int]] | None = None
#: TotalSegmentator's SNOMED CT mapping: structure name -> property_category/type/modifier -> value, scheme, meaning.
_SNOMED: dict[str, dict[str, dict[str, str]]] | None = None


def _ts_colors() -> dict[str, tuple[int, int, int]]:
    global _TS_COLORS
    if _TS_COLORS is None:
        from totalsegmentator.dicom_utils import load_color_mapping

        _TS_COLORS = load_color_mapping()
    return _TS_COLORS


def _snomed() -> dict[str, dict[str, dict[str, str]]]:
    global _SNOMED
    if _SNOMED is None:
        from totalsegmentator.dicom_utils import load_snomed_mapping

        _SNOMED = load_snomed_mapping()
    return _SNOMED


def _codes() -> Concepts:
    from pydicom.sr.codedict import codes

    return codes


def _segment_description(
    number: int, name: str, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    import highdicom as hd

    codes = _codes()
    entry = _snomed().get(name)
    if entry:
        category = hd.sr.CodedConcept(**_concept(entry["property_category"]))
        prop_type = hd.sr.CodedConcept(**_concept(entry["property_type"]))
    else:
        category = codes.SCT.AnatomicalStructure
        prop_type = codes.SCT.AnatomicalStructure
    rgb = _ts_colors().get(name)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=category,
        segmented_property_type=prop_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*rgb) if rgb is not None else None,
    )
    modifier = entry.get("property_modifier") if entry else None
    if modifier:
        from pydicom import Dataset

        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
            modifier["value"],
            modifier["scheme"],
            modifier["meaning"],
        )
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [item]
    return description


def _concept(code: Mapping[str, str]) -> dict[str, str]:
    return {"value": code["value"], "scheme_designator": code["scheme"], "meaning": code["meaning"]}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

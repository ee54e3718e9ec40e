"""Synthetic abdomen/lower-thorax CT phantom with ground-truth labels at TotalSegmentator ``total`` ids.

TotalSegmentator's real weights cannot be downloaded here, so the project trains its own small networks on
this phantom and tests the pipeline with it. The anatomy is defined analytically in world (RAS, mm)
coordinates, so one phantom can be rasterised at any spacing, shape and orientation: the same seed gives the
same patient whatever the grid, which is what lets tests check resampling, reorientation and left/right.

RAS+ (NIfTI/nibabel world): +x is the patient's RIGHT, +y anterior, +z superior (DICOM's LPS negates x and
y). The patient lies supine on a table (posterior, -y).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Structures drawn, by their TotalSegmentator ``total`` name. Later entries overwrite earlier ones.
PHANTOM_STRUCTURES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_lower_lobe_right",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "urinary_bladder",
    "iliopsoas_left",
    "iliopsoas_right",
    "autochthon_left",
    "autochthon_right",
    "heart",
    "aorta",
    "vertebrae_T11",
    "vertebrae_T12",
    "vertebrae_L1",
    "vertebrae_L2",
    "vertebrae_L3",
    "vertebrae_L4",
    "vertebrae_L5",
    "rib_left_11",
    "rib_left_12",
    "rib_right_11",
    "rib_right_12",
)

#: Mean HU of each tissue (portal-venous phase), chosen so a tiny network can tell neighbours apart.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "visceral_fat": -85.0,
    "muscle": 45.0,
    "bowel": 25.0,
    "disc": 80.0,
    "table": 150.0,
    "lung_upper": -860.0,
    "lung_lower": -800.0,
    "liver": 105.0,
    "spleen": 125.0,
    "kidney": 185.0,
    "urinary_bladder": 10.0,
    "iliopsoas": 55.0,
    "autochthon": 55.0,
    "heart": 135.0,
    "aorta": 165.0,
    "vertebra": 320.0,
    "rib": 480.0,
}

#: Default field of view in world mm, (min, max) per RAS axis.
DEFAULT_FOV_MM = ((-200.0, 200.0), (-150.0, 150.0), (-200.0, 170.0))

NOISE_SD_HU = 15.0
PSF_SD_MM = 0.6
BODY_A_MM, BODY_B_MM = 160.0, 115.0  # semi-axes of the body cross-section (left-right, antero-posterior)
RIGHT, LEFT = +1.0, -1.0  # sign of x on the patient's side, in RAS+
SIDES = ((LEFT, "left"), (RIGHT, "right"))
VERTEBRA_Z_MM = {"T11": 104.0, "T12": 70.0, "L1": 36.0, "L2": 2.0, "L3": -32.0, "L4": -66.0, "L5": -100.0}


def phantom_labels() -> dict[int, str]:
    """The ``total`` label ids the phantom contains, with their names."""
    from totalsegmentator.map_to_binary import class_map

    ids = {name: i for i, name in class_map["total"].items()}
    return {ids[name]: name for name in sorted(PHANTOM_STRUCTURES, key=ids.__getitem__)}


@dataclass(frozen=True)
class PhantomParams:
    """What varies between phantom patients (drawn from the seed)."""

    shift_mm: np.ndarray  # (3,) world translation of the body
    scale: float  # whole-body size
    rotation_rad: float  # about the body (z) axis
    organ_scale: dict  # per-organ size factors
    hu_offset: dict  # per-tissue contrast variation

    @classmethod
    def from_seed(cls, seed: int) -> PhantomParams:
        rng = np.random.default_rng([seed, 0])
        organs = ("lungs", "liver", "spleen", "kidneys", "urinary_bladder", "heart", "aorta", "iliopsoas")
        return cls(
            shift_mm=rng.uniform([-15, -10, -20], [15, 10, 20]),
            scale=float(rng.uniform(0.85, 1.15)),
            rotation_rad=float(np.deg2rad(rng.uniform(-8, 8))),
            organ_scale={o: float(rng.uniform(0.9, 1.1)) for o in organs},
            hu_offset={t: float(rng.normal(0, 6)) for t in HU if t != "air"},
        )


def default_affine(spacing=(3.0, 3.0, 3.0), axcodes: str = "RAS") -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of a grid covering ``DEFAULT_FOV_MM`` at ``spacing`` (mm along world x, y, z), its
    array axes stored in ``axcodes`` orientation (e.g. "LPS" as DICOM converters write)."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    lo = np.array([f[0] for f in DEFAULT_FOV_MM])
    hi = np.array([f[1] for f in DEFAULT_FOV_MM])
    shape = np.floor((hi - lo) / spacing).astype(int)
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = (lo + hi) / 2 - (shape - 1) / 2 * spacing
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    affine = ras @ ornt.inv_ornt_aff(transform, tuple(shape))
    new_shape = np.empty(3, dtype=int)
    new_shape[transform[:, 0].astype(int)] = shape
    i, j, k = (int(s) for s in new_shape)
    return affine, (i, j, k)


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _tube_z(x, y, z, cx, cy, r, z0, z1):
    """Cylinder along z whose centre and radius may vary linearly with z (arrays or scalars at z0 -> z1)."""
    t = np.clip((z - z0) / (z1 - z0), 0.0, 1.0)
    cxz = cx[0] + t * (cx[1] - cx[0])
    cyz = cy[0] + t * (cy[1] - cy[0])
    rz = r[0] + t * (r[1] - r[0])
    return ((x - cxz) ** 2 + (y - cyz) ** 2 <= rz**2) & (z >= z0) & (z <= z1)


def _tube_box(cx, cy, r, z0, z1):
    return (min(cx) - max(r), min(cy) - max(r), z0), (max(cx) + max(r), max(cy) + max(r), z1)


def _vertebra(x, y, z, zc):
    """Body (elliptic cylinder), neural arch around the canal, spinous and transverse processes."""
    dz = np.abs(z - zc)
    body = (((x / 21.0) ** 2 + ((y + 45.0) / 16.0) ** 2) <= 1.0) & (dz <= 13.0)
    rho2 = x**2 + (y + 72.0) ** 2
    arch = (rho2 >= 8.0**2) & (rho2 <= 15.0**2) & (y <= -58.0) & (dz <= 9.0)
    pedicles = (np.abs(np.abs(x) - 11.0) <= 4.0) & (y > -66.0) & (y <= -58.0) & (dz <= 7.0)
    spinous = (np.abs(x) <= 4.0) & (y <= -84.0) & (y >= -104.0) & (z - zc <= 6.0) & (z - zc >= -10.0)
    transverse = (np.abs(x) <= 38.0) & (np.abs(y + 70.0) <= 5.0) & (dz <= 5.0)
    return body | arch | pedicles | spinous | transverse


def _rib(x, y, z, side, z_root, length_rad):
    """A rib: a 6 mm tube along an ellipse just inside the body wall, descending as it runs anteriorly."""
    ax, by = BODY_A_MM - 32.0, BODY_B_MM - 28.0
    u = side * x / ax
    v = -(y + 10.0) / by
    s = np.sqrt(u**2 + v**2)
    theta = np.arctan2(u, v)  # 0 posterior midline, pi/2 lateral
    theta0 = 0.42
    t = np.clip((theta - theta0) / length_rad, 0.0, 1.0)
    z_rib = z_root - 35.0 * t
    dist2 = ((s - 1.0) * 0.5 * (ax + by)) ** 2 + (z - z_rib) ** 2
    return (theta >= theta0) & (theta <= theta0 + length_rad) & (u > 0) & (dist2 <= 6.0**2)


def _lung(x, y, z, side, k):
    r = np.array([58.0, 72.0, 95.0]) * k
    c = (side * 78.0, -5.0, 140.0)
    lung = _ellipsoid(x, y, z, c, r)
    lower = 0.8 * (z - 120.0) + 0.6 * (y + 5.0) < 0.0  # oblique fissure: posterior-inferior is lower lobe
    return lung & ~lower, lung & lower


def make_phantom(
    seed: int,
    spacing=(3.0, 3.0, 3.0),
    shape: tuple[int, int, int] | None = None,
    affine: np.ndarray | None = None,
    axcodes: str = "RAS",
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Rasterise phantom ``seed`` on a grid: (CT in HU as int16, labels at ``total`` ids as uint8).

    Without ``affine``: the default field of view at ``spacing``, stored in ``axcodes`` orientation. With
    ``affine`` (any orientation, even oblique), ``spacing`` and ``axcodes`` are ignored and ``shape`` defaults
    to the default field of view's voxel count at the affine's voxel sizes.
    """
    if affine is None:
        affine, default_shape = default_affine(spacing, axcodes)
    else:
        affine = np.asarray(affine, dtype=float)
        default_shape = default_affine(nib.affines.voxel_sizes(affine))[1]
    grid = tuple(int(s) for s in (shape or default_shape))
    p = PhantomParams.from_seed(seed)
    rng = np.random.default_rng([seed, 1])
    canvas = _Canvas(p, affine, grid)
    _draw_soft_tissue(canvas)
    _draw_organs(canvas)
    _draw_skeleton(canvas)
    return _images(canvas, affine, rng)


class _Canvas:
    """The phantom being drawn: template coordinates of every voxel, and the HU and label volumes."""

    def __init__(self, p: PhantomParams, affine: np.ndarray, shape: tuple[int, ...]):
        self.p, self.shape, self.inv_affine = p, shape, np.linalg.inv(affine)
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        world = (affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:].astype(np.float32)).reshape(3, *shape)
        del ijk
        # World -> template coordinates: undo shift, rotation about z, and body scale.
        d = world - p.shift_mm.astype(np.float32).reshape(3, 1, 1, 1)
        self.cos, self.sin = np.cos(p.rotation_rad), np.sin(p.rotation_rad)
        self.x = (self.cos * d[0] + self.sin * d[1]) / p.scale
        self.y = (-self.sin * d[0] + self.cos * d[1]) / p.scale
        self.z = d[2] / p.scale
        del d
        self.ids = {name: i for i, name in phantom_labels().items()}
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        # Table: world-fixed slab just below the (rotated, scaled) body.
        half_height = p.scale * np.hypot(BODY_A_MM * self.sin, BODY_B_MM * self.cos)
        table_top = p.shift_mm[1] - half_height - 1.0
        table = (world[1] <= table_top) & (world[1] >= table_top - 15.0) & (np.abs(world[0]) <= 230.0)
        self.hu[table] = self.tissue("table")

    def tissue(self, name: str) -> float:
        return HU[name] + self.p.hu_offset.get(name, 0.0)

    def block(self, lo, hi) -> tuple[slice, ...]:
        """Voxel slices that hold the template-space box [lo, hi]: structures are drawn only there (speed)."""
        p, cos, sin = self.p, self.cos, self.sin
        corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=float)
        rotated = [
            p.scale * (cos * corners[:, 0] - sin * corners[:, 1]),
            p.scale * (sin * corners[:, 0] + cos * corners[:, 1]),
            p.scale * corners[:, 2],
        ]
        ijk = nib.affines.apply_affine(self.inv_affine, np.stack(rotated, axis=1) + p.shift_mm)
        start = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, self.shape)
        stop = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, 0, self.shape)
        return tuple(slice(a, b) for a, b in zip(start, stop))

    def put(self, hu_name, label, mask_fn, box=None) -> None:
        """Draw ``mask_fn(x, y, z)`` (template mm) with a tissue's HU and, if given, a label; later wins."""
        b = self.block(*box) if box is not None else (slice(None),) * 3
        mask = mask_fn(self.x[b], self.y[b], self.z[b])
        self.hu[b][mask] = self.tissue(hu_name)
        if label is not None:
            self.labels[b][mask] = self.ids[label]


def _ellipsoid_at(c, r):
    """An ellipsoid's mask function and its bounding box, as :meth:`_Canvas.put` takes them."""
    c, r = np.asarray(c, dtype=float), np.asarray(r, dtype=float)
    return (lambda x, y, z: _ellipsoid(x, y, z, c, r)), (c - r, c + r)


def _draw_soft_tissue(canvas: _Canvas) -> None:
    put = canvas.put
    put("fat", None, lambda x, y, z: (x / BODY_A_MM) ** 2 + (y / BODY_B_MM) ** 2 <= 1.0)
    wall_a, wall_b = BODY_A_MM - 20.0, BODY_B_MM - 20.0  # anterolateral abdominal wall muscle
    put("muscle", None, lambda x, y, z: ((x / wall_a) ** 2 + (y / wall_b) ** 2 <= 1.0) & (y > -40.0))
    vis_a, vis_b = BODY_A_MM - 30.0, BODY_B_MM - 30.0
    put("visceral_fat", None, lambda x, y, z: (x / vis_a) ** 2 + (y / vis_b) ** 2 <= 1.0)
    for c, r in (((-20, 55, -60), (30, 22, 25)), ((35, 50, -20), (28, 20, 22)), ((5, 60, -105), (32, 20, 18))):
        put("bowel", None, *_ellipsoid_at(c, r))


def _draw_organs(canvas: _Canvas) -> None:
    put, k = canvas.put, canvas.p.organ_scale
    for side, name in SIDES:
        c, r = np.array([side * 78.0, -5.0, 140.0]), np.array([58.0, 72.0, 95.0]) * k["lungs"]
        for lobe, part in (("upper", 0), ("lower", 1)):
            put(
                f"lung_{lobe}",
                f"lung_{lobe}_lobe_{name}",
                lambda x, y, z: _lung(x, y, z, side, k["lungs"])[part],
                (c - r, c + r),
            )
    put("liver", "liver", *_ellipsoid_at((RIGHT * 62, 5, 40), np.array([82, 72, 62]) * k["liver"]))
    put("spleen", "spleen", *_ellipsoid_at((LEFT * 88, -30, 50), np.array([32, 26, 48]) * k["spleen"]))
    kid = np.array([26, 24, 48]) * k["kidneys"]
    put("kidney", "kidney_right", *_ellipsoid_at((RIGHT * 66, -42, -12), kid))
    put("kidney", "kidney_left", *_ellipsoid_at((LEFT * 66, -42, -2), kid))
    bladder = np.array([45, 34, 30]) * k["urinary_bladder"]
    put("urinary_bladder", "urinary_bladder", *_ellipsoid_at((0, 35, -162), bladder))
    pr = k["iliopsoas"]
    for side, name in SIDES:
        tubes = (
            ("iliopsoas", (side * 36.0, side * 68.0), (-40.0, -18.0), (11.0 * pr, 24.0 * pr), -185.0, 30.0),
            ("autochthon", (side * 30.0,) * 2, (-86.0, -86.0), (18.0, 18.0), -125.0, 135.0),
        )
        for muscle, cx, cy, rr, z0, z1 in tubes:
            put(
                muscle,
                f"{muscle}_{name}",
                lambda x, y, z: _tube_z(x, y, z, cx, cy, rr, z0, z1),
                _tube_box(cx, cy, rr, z0, z1),
            )
    put("heart", "heart", *_ellipsoid_at((LEFT * 18, 22, 125), np.array([58, 48, 48]) * k["heart"]))
    cx, cy, rr, z0, z1 = (LEFT * 14.0, LEFT * 14.0), (-20.0, -22.0), (12.0 * k["aorta"],) * 2, -80.0, 400.0
    put("aorta", "aorta", lambda x, y, z: _tube_z(x, y, z, cx, cy, rr, z0, z1), _tube_box(cx, cy, rr, z0, z1))


def _draw_skeleton(canvas: _Canvas) -> None:
    put = canvas.put
    put(
        "disc",
        None,
        lambda x, y, z: (x**2 + ((y + 45.0) / 0.8) ** 2 <= 20.0**2) & (z >= -113.0) & (z <= 117.0),
        ((-20.0, -61.0, -113.0), (20.0, -29.0, 117.0)),
    )
    for level, zc in VERTEBRA_Z_MM.items():
        box = ((-38.0, -104.0, zc - 13.0), (38.0, -29.0, zc + 13.0))
        put("vertebra", f"vertebrae_{level}", lambda x, y, z: _vertebra(x, y, z, zc), box)
    for side, name in SIDES:
        for number, level, length in ((11, "T11", 1.55), (12, "T12", 1.15)):
            z_root = VERTEBRA_Z_MM[level] + 4.0
            box = (
                (min(0.0, side * BODY_A_MM), -BODY_B_MM, z_root - 45.0),
                (max(0.0, side * BODY_A_MM), BODY_B_MM, z_root + 10.0),
            )
            put("rib", f"rib_{name}_{number}", lambda x, y, z: _rib(x, y, z, side, z_root, length), box)


def _images(canvas: _Canvas, affine: np.ndarray, rng: np.random.Generator) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The drawn phantom as a scanner would give it: blurred by the PSF, with noise, in int16 HU."""
    sigma_vox = PSF_SD_MM / nib.affines.voxel_sizes(affine)
    hu = ndimage.gaussian_filter(canvas.hu, sigma_vox, mode="nearest")
    hu += rng.normal(0.0, NOISE_SD_HU, size=canvas.shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    ct_img = nib.Nifti1Image(ct, affine)
    ct_img.header.set_xyzt_units("mm", "sec")
    ct_img.set_qform(affine, code=1)
    ct_img.set_sform(affine, code=1)
    lab_img = nib.Nifti1Image(canvas.labels, affine)
    lab_img.set_qform(affine, code=1)
    lab_img.set_sform(affine, code=1)
    return ct_img, lab_img

"""Loading, validating, reorienting and resampling structural MR images.

Anything nibabel reads (NIfTI-1/2 `.nii`/`.nii.gz`, FreeSurfer `.mgz`, MINC, ...) comes in as a
3D array plus its voxel-to-world affine (mm, RAS+ world). Every problem a user can cause (a missing,
corrupt or truncated file, a 4D series where a 3D volume is expected, NaN/Inf voxels, an all-zero
brain) becomes a one-line `DataError` that names the subject and the file.

Images are brought to one canonical voxel orientation, RAS+ (first voxel axis runs to the Right,
second to Anterior, third to Superior), with exactly the semantics of
`nibabel.as_closest_canonical`, but the orientation transform is returned so that a map made on the
canonical grid can be put back onto the subject's own voxel order exactly (`undo_orientation`).

Headers are checked before anything is sized or read from them (`read_geometry`, `load_image`):
- the voxel-to-world affine is nibabel's choice (sform if sform_code > 0, else qform if
  qform_code > 0); with both codes 0 nibabel falls back to an ANALYZE affine from the voxel sizes
  whose left-right direction is a guess (the NIfTI standard calls it unspecified), so such a file
  is refused; pixdim[1:4] must be finite and non-zero (negative ones are taken as their absolute
  values, as nibabel does);
- spatial units (xyzt_units) are honoured: metres and microns are converted to mm, unknown (0)
  counts as mm, any other code is refused;
- every voxel edge must lie in [MIN_VOXEL_MM, MAX_VOXEL_MM] = [0.1, 20] mm: below 0.1 mm no
  scanner images a whole brain (a 198 mm cube would need > 1980^3 voxels), above 20 mm a brain is
  fewer than 10 voxels across;
- a single-file NIfTI whose vox_offset points inside its header (header bytes would be read as
  voxels) is refused, and so is a payload shorter than the header's dimensions and type promise
  (checked before anything is allocated);
- scl_slope must be finite and not negative (0 means unscaled, as the NIfTI standard says);
  scl_inter must be finite; an intercept that turns the zero background into non-zero values
  is refused (the brain is found from non-zero voxels);
- gzip-compressed files (.nii.gz, .mgz) are decompressed whole by Python's gzip module, which
  checks the stream's CRC-32 and length at its end (nibabel alone reads only the bytes it needs
  and can miss a garbled stream).

Oblique images (voxel axes rotated against the world axes, `is_oblique`) are not merely
reoriented: `aligned_grid` gives the axis-aligned grid that `preprocess` resamples them onto.
"""

from __future__ import annotations

import gzip
import os
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import arrayproxy, filebasedimages, openers, orientations, spaces
from scipy import ndimage

from jax_brainage.errors import DataError

# The orientation of a RAS+ canonical grid in nibabel's `ornt` notation ([axis, flip] per axis).
RAS_ORNT = orientations.axcodes2ornt(("R", "A", "S"))

# Plausible voxel edge lengths (mm) of a brain image (see the module docstring).
MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 20.0
# NIfTI xyzt_units spatial codes (the low 3 bits) -> (name, mm per unit), as nibabel names them.
SPATIAL_UNITS = {0: ("unknown", 1.0), 1: ("meter", 1000.0), 2: ("mm", 1.0), 3: ("micron", 1e-3)}
# An affine is oblique when treating it as axis-aligned (each voxel axis along its nearest world
# axis, same length) would move some voxel of the field of view by more than this many voxels:
# below half a voxel, reorienting puts every voxel where nearest-neighbour resampling would.
OBLIQUE_TOLERANCE_VOXELS = 0.5
# Files nibabel reads through gzip (their CRC is checked by decompressing them whole).
GZIP_SUFFIXES = (".gz", ".mgz")


def describe(path: str | os.PathLike | None, subject: str | None) -> str:
  """The `subject: file` prefix of every error about one image."""
  parts = [p for p in (subject, os.fspath(path) if path is not None else None) if p]
  return ": ".join(parts) if parts else "image"


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _open(path: str | os.PathLike, *, whole: bool):
  """Opens an image and reads its raw header; returns `(img, raw NIfTI header or None, bytes)`.

  `bytes` is the size of the (decompressed) file holding the voxels, or None when unknown. With
  `whole`, a gzip-compressed file is decompressed completely (the CRC check) and, for single-file
  formats, the image is rebuilt from the decompressed bytes (read once).
  """
  img = nib.load(os.fspath(path))
  header = None
  if isinstance(img.header, nib.Nifti1Header):  # Also NIfTI-2 (a subclass).
    # The image's own header is a working copy (nibabel resets vox_offset and the scaling in
    # it); the checks need the fields as stored.
    header_file = img.file_map.get("header", img.file_map["image"]).filename
    with openers.ImageOpener(header_file) as f:
      header = type(img.header).from_fileobj(f, check=False)
  image_file = img.file_map["image"].filename
  available = None
  if image_file is not None and image_file.lower().endswith(GZIP_SUFFIXES):
    if whole:
      with gzip.open(image_file, "rb") as f:  # Raises at EOF on a bad CRC-32 or length.
        payload = f.read()
      available = len(payload)
      if isinstance(img, filebasedimages.SerializableImage) and set(img.file_map) == {"image"}:
        img = type(img).from_bytes(payload)
      del payload
  elif image_file is not None:
    available = os.path.getsize(image_file)
  return img, header, available


def _spatial_unit(header, where: str) -> tuple[str, float]:
  code = int(header["xyzt_units"]) & 0x07
  if code not in SPATIAL_UNITS:
    raise DataError(f"{where}: unknown spatial unit code {code} in xyzt_units (NIfTI knows 0 "
                    "unknown, 1 meter, 2 mm, 3 micron)")
  return SPATIAL_UNITS[code]


def _checked_affine(img, header, where: str) -> np.ndarray:
  """The image's voxel-to-world affine `[4, 4]` in mm, after every geometry check."""
  affine = np.array(img.affine, dtype=np.float64)
  unit, scale = "mm", 1.0
  if header is not None:
    pixdim = np.asarray(header["pixdim"][1:4], np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
      raise DataError(f"{where}: invalid voxel size in the header (pixdim "
                      f"{', '.join(f'{v:g}' for v in pixdim)}): must be finite and non-zero")
    unit, scale = _spatial_unit(header, where)
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
      raise DataError(
          f"{where}: no orientation in the header (qform_code and sform_code are 0), so which "
          "side is left is unknown; store the image with its sform or qform set")
  if affine.shape == (4, 4):
    affine[:3] *= scale  # World coordinates in mm (rows, so the origin is converted too).
  return check_affine(affine, where, unit="" if unit in ("mm", "unknown") else unit)


def check_affine(affine: np.ndarray, where: str = "image", *, unit: str = "") -> np.ndarray:
  """Checks a voxel-to-world affine `[4, 4]` (mm); returns it as float64.

  Raises:
    DataError: one line naming `where` unless the affine is finite, every voxel edge lies in
      [MIN_VOXEL_MM, MAX_VOXEL_MM] and the voxel axes are independent. `unit` (e.g. "micron")
      names the header's units in the message.
  """
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DataError(f"{where}: invalid voxel-to-world affine (not a finite 4x4 matrix)")
  sizes = voxel_size(affine)
  if not (np.all(sizes >= MIN_VOXEL_MM) and np.all(sizes <= MAX_VOXEL_MM)):
    raise DataError(
        f"{where}: implausible voxel size {'x'.join(f'{v:.4g}' for v in sizes)} mm"
        f"{f' (xyzt_units {unit})' if unit else ''}; expected {MIN_VOXEL_MM:g} to "
        f"{MAX_VOXEL_MM:g} mm per edge")
  if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(sizes)):
    raise DataError(f"{where}: singular voxel-to-world affine (voxel axes are not independent)")
  return affine


def _check_layout(img, header, available: int | None, where: str) -> None:
  """Refuses voxel data that would be read from the header or from beyond the file's end."""
  if header is not None and header["magic"].item() in (b"n+1", b"n+2"):
    offset, minimum = float(header["vox_offset"]), type(header).single_vox_offset
    if not offset >= minimum:
      raise DataError(f"{where}: vox_offset {offset:g} lies inside the {minimum}-byte header "
                      "(header bytes would be read as voxels)")
  proxy = img.dataobj
  if not isinstance(proxy, arrayproxy.ArrayProxy):
    return
  shape = tuple(int(s) for s in proxy.shape)
  if any(s < 1 for s in shape):
    raise DataError(f"{where}: invalid image dimensions {shape}")
  need = int(np.prod(shape, dtype=object)) * np.dtype(proxy.dtype).itemsize
  if available is not None and int(proxy.offset) + need > available:
    raise DataError(
        f"{where}: truncated or corrupt image (the header promises {need} bytes of voxels at "
        f"offset {int(proxy.offset)}, the file holds {available} bytes)")


def _check_scaling(header, where: str) -> None:
  if header is None:
    return
  slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
  if slope == 0:
    return  # NIfTI: no scaling.
  if not np.isfinite(slope) or slope < 0:
    raise DataError(f"{where}: invalid intensity scaling scl_slope {slope:g} (must be a finite, "
                    "positive number, or 0 for none)")
  if not np.isfinite(inter):
    raise DataError(f"{where}: invalid intensity scaling scl_inter {inter:g} (not finite)")


def read_geometry(
    path: str | os.PathLike, subject: str | None = None
) -> tuple[tuple[int, ...], np.ndarray]:
  """The checked grid of an image file from its header alone (no voxel is read).

  Returns:
    (shape, voxel-to-world affine `[4, 4]` in mm), after the checks of the module docstring
    (voxel sizes, units, codes, layout); the same affine `load_image` gives the image.

  Raises:
    DataError: one line naming subject and file.
  """
  where = describe(path, subject)
  if not os.path.isfile(path):
    raise DataError(f"{where}: file not found" if not os.path.exists(path) else
                    f"{where}: not a regular file, expected an image file")
  try:
    img, header, available = _open(path, whole=False)
    _check_layout(img, header, available, where)
    affine = _checked_affine(img, header, where)
    return tuple(int(s) for s in img.shape), affine
  except (DataError, MemoryError):
    raise
  except Exception as e:  # nibabel raises many types for bad files; the user needs one line.
    raise DataError(f"{where}: unreadable or corrupt image ({_one_line(e)})") from e


def load_image(
    path: str | os.PathLike,
    subject: str | None = None,
    *,
    require_brain: bool = True,
) -> nib.Nifti1Image:
  """Reads one 3D image and checks it; returns an in-memory `Nifti1Image`.

  Args:
    path: any file nibabel reads (.nii, .nii.gz, .mgz, ...).
    subject: the subject id, used only to name the culprit in errors.
    require_brain: raise if every voxel is zero (an empty brain).

  Returns:
    Image with data `[x, y, z]` (the file's own dtype, native byte order, scaling applied by
    nibabel) and the file's voxel-to-world affine in mm (nibabel's `img.affine`, converted from
    metres or microns when xyzt_units says so). Trailing singleton axes (e.g. a `[x, y, z, 1]`
    series) are dropped.

  Raises:
    DataError: one line naming subject and file, for a missing, unreadable, corrupt or truncated
      file (a gzip stream failing its CRC included), a header failing the checks of the module
      docstring, a non-3D image, NaN/Inf voxels or (with `require_brain`) an all-zero image.
  """
  where = describe(path, subject)
  if not os.path.exists(path):
    raise DataError(f"{where}: file not found")
  if os.path.isdir(path):
    raise DataError(f"{where}: is a directory, expected an image file")
  try:
    img, header, available = _open(path, whole=True)
    _check_layout(img, header, available, where)
    affine = _checked_affine(img, header, where)
    _check_scaling(header, where)
    # Reading the voxels is where truncated or corrupt payloads fail (header reads are lazy).
    data = np.asarray(np.asanyarray(img.dataobj))
    proxy = img.dataobj
    if (isinstance(proxy, arrayproxy.ArrayProxy) and float(proxy.inter) != 0
        and not np.any(data == 0) and np.any(np.asarray(proxy.get_unscaled()) == 0)):
      raise DataError(
          f"{where}: scl_inter {float(proxy.inter):g} turns the zero background into "
          f"{float(proxy.inter):g}: the brain is found from non-zero voxels (store the image "
          "without the intercept)")
  except (DataError, MemoryError):
    raise
  except Exception as e:  # nibabel raises many types for bad files; the user needs one line.
    raise DataError(f"{where}: unreadable or corrupt image ({_one_line(e)})") from e
  if data.dtype.byteorder not in ("=", "|"):
    data = data.astype(data.dtype.newbyteorder("="))
  data = check_volume(data, path, subject, require_brain=require_brain)
  return make_image(data, affine)


def check_volume(
    data: np.ndarray,
    path: str | os.PathLike | None = None,
    subject: str | None = None,
    *,
    require_brain: bool = True,
) -> np.ndarray:
  """Checks that `data` is one finite 3D volume; returns it `[x, y, z]`.

  Trailing singleton axes beyond the third are dropped (a one-volume 4D series is a 3D image).
  """
  where = describe(path, subject)
  data = np.asarray(data)
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    if data.ndim > 3:
      raise DataError(
          f"{where}: {data.ndim}D image of shape {tuple(data.shape)} where a 3D volume is expected"
          f" ({int(np.prod(data.shape[3:]))} volumes)")
    raise DataError(f"{where}: {data.ndim}D image of shape {tuple(data.shape)}, expected 3D")
  if min(data.shape) < 1:
    raise DataError(f"{where}: empty image of shape {tuple(data.shape)}")
  if data.dtype.kind not in "biuf":
    raise DataError(f"{where}: unsupported voxel type {data.dtype} (expected integer or real)")
  if data.dtype.kind == "f":
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
      raise DataError(f"{where}: {bad} NaN/Inf voxels")
  if require_brain and not np.any(data):
    raise DataError(f"{where}: empty brain (every voxel is zero)")
  return data


def voxel_size(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths `[3]` in mm of a voxel-to-world affine `[4, 4]`."""
  affine = np.asarray(affine, dtype=np.float64)
  return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


def make_image(data: np.ndarray, affine: np.ndarray, *, description: str | None = None,
               intent: tuple[str, str] | None = None) -> nib.Nifti1Image:
  """An in-memory NIfTI-1 image of `data` `[x, y, z(, k)]` with voxel-to-world `affine` (mm).

  NIfTI has no bool or float16: bool becomes uint8 and float16 float32. 64-bit integers are kept
  (nibabel only wants them stated explicitly). The header states spatial units mm (xyzt_units),
  and, where given, `description` (the header's 80-byte `descrip`, cut to fit) and `intent`
  (code, name), e.g. ("estimate", "years/voxel"): what FSLeyes / MRIcroGL show a reader.
  """
  data = np.asarray(data)
  if data.dtype == bool:
    data = data.astype(np.uint8)
  elif data.dtype == np.float16:
    data = data.astype(np.float32)
  img = nib.Nifti1Image(data, np.asarray(affine, np.float64), dtype=data.dtype)
  img.header.set_xyzt_units(xyz="mm")
  if description:
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
  if intent is not None:
    code, name = intent
    img.header.set_intent(code, name=name[:15])
  return img


# ---------------------------------------------------------------------------------------------
# Orientation.


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
  """The transform `[3, 2]` (nibabel `ornt`) that brings voxel axes to RAS+.

  Row i says where original voxel axis i goes (canonical axis) and whether it flips (-1). This is
  `nib.io_orientation(affine)`, the transform that `nib.as_closest_canonical` applies.
  """
  return orientations.io_orientation(np.asarray(affine, dtype=np.float64))


def invert_orientation(ornt: np.ndarray) -> np.ndarray:
  """The `ornt` that undoes `ornt` (canonical voxel order -> original voxel order)."""
  ornt = np.asarray(ornt, dtype=np.float64)
  inverse = np.empty_like(ornt)
  for axis, (target, flip) in enumerate(ornt):
    inverse[int(target)] = (axis, flip)
  return inverse


def reorient_array(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Applies `ornt` to the three spatial axes of `[x, y, z]` or `[x, y, z, k]` (a view)."""
  return orientations.apply_orientation(data, np.asarray(ornt))


def reorient_affine(affine: np.ndarray, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
  """The affine `[4, 4]` of an image with spatial `shape` after `reorient_array(., ornt)`."""
  return np.asarray(affine, np.float64) @ orientations.inv_ornt_aff(np.asarray(ornt), shape[:3])


def to_canonical(img: nib.spatialimages.SpatialImage) -> tuple[nib.Nifti1Image, np.ndarray]:
  """Brings an image to RAS+ voxel order; returns `(canonical image, ornt)`.

  The data is only transposed/flipped (no interpolation), so `undo_orientation(canonical data,
  ornt)` gives back the original array exactly. Matches `nib.as_closest_canonical`.
  """
  affine = np.asarray(img.affine, dtype=np.float64)
  ornt = canonical_orientation(affine)
  data = np.asanyarray(img.dataobj)
  canonical = reorient_array(data, ornt)
  return make_image(canonical, reorient_affine(affine, data.shape, ornt)), ornt


def undo_orientation(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Puts a canonical `[x, y, z]` or `[x, y, z, k]` array back into the original voxel order."""
  return reorient_array(data, invert_orientation(ornt))


# ---------------------------------------------------------------------------------------------
# Resampling.


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    *,
    order: int = 1,
) -> np.ndarray:
  """Resamples `data` on grid `affine` onto the grid (`shape`, `target_affine`) (world mm).

  Args:
    data: `[x, y, z]` or `[x, y, z, k]` (each of the k channels resampled alike).
    affine: voxel-to-world `[4, 4]` of `data`.
    shape: spatial shape `[3]` of the target grid.
    target_affine: voxel-to-world `[4, 4]` of the target grid.
    order: spline order, 0 = nearest neighbour (labels, masks), 1 = trilinear (images, maps).

  Returns:
    float32 (order > 0) or `data.dtype` (order 0) array `[*shape]` or `[*shape, k]`; points
    outside `data`'s field of view are 0. Same result as `nibabel.processing.resample_from_to`.
  """
  data = np.asarray(data)
  vox = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
  out_dtype = data.dtype if order == 0 else np.float32
  shape = tuple(int(s) for s in shape[:3])

  def one(volume: np.ndarray) -> np.ndarray:
    volume = volume if order == 0 else volume.astype(np.float64, copy=False)
    if volume.dtype == bool:
      volume = volume.astype(np.uint8)
    out = ndimage.affine_transform(
        volume, vox[:3, :3], vox[:3, 3], output_shape=shape, order=order, mode="constant",
        cval=0.0)
    return out.astype(out_dtype, copy=False)

  if data.ndim == 3:
    return one(data)
  return np.stack([one(data[..., c]) for c in range(data.shape[-1])], axis=-1)


def isotropic_grid(
    shape: Sequence[int], affine: np.ndarray, size_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
  """A RAS+ grid of `size_mm` isotropic voxels that covers the field of view of (shape, affine).

  Same grid as `nibabel.processing.resample_to_output(img, size_mm)` builds: axis-aligned in
  world space, its first voxel at the lowest corner of the input's voxel-centre bounding box.
  """
  out_shape, out_affine = spaces.vox2out_vox(
      (tuple(int(s) for s in shape[:3]), np.asarray(affine, np.float64)), (size_mm,) * 3)
  return tuple(out_shape), np.asarray(out_affine, np.float64)


def needs_resampling(affine: np.ndarray, size_mm: float | None, tol: float = 1e-3) -> bool:
  """Whether an image on `affine` must be resampled to reach `size_mm` isotropic voxels."""
  if size_mm is None:
    return False
  return bool(np.any(np.abs(voxel_size(affine) - size_mm) > tol * size_mm))


def same_grid(shape_a, affine_a, shape_b, affine_b, tol: float = 1e-4) -> bool:
  """Whether two images share a voxel grid (shape and affine up to `tol` mm)."""
  return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(
      np.asarray(affine_a, np.float64), np.asarray(affine_b, np.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Oblique affines.


def _axis_aligned(affine: np.ndarray) -> np.ndarray:
  """The linear part `[3, 3]` with each voxel axis put on its nearest world axis (same length,
  same direction sign), as reorientation alone treats it."""
  linear = np.asarray(affine, np.float64)[:3, :3]
  aligned = np.zeros((3, 3))
  for i, (axis, flip) in enumerate(canonical_orientation(affine)):
    aligned[int(axis), i] = flip * np.linalg.norm(linear[:, i])
  return aligned


def obliquity_mm(shape: Sequence[int], affine: np.ndarray) -> float:
  """How far (mm) ignoring the rotation of `affine` would move the farthest voxel of the field of
  view `shape` (measured from its centre, over its 8 corners)."""
  affine = np.asarray(affine, np.float64)
  difference = affine[:3, :3] - _axis_aligned(affine)
  half = (np.asarray(shape[:3], np.float64) - 1) / 2
  corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
  return float(np.max(np.linalg.norm(difference @ corners, axis=0)))


def obliquity_degrees(affine: np.ndarray) -> float:
  """The largest angle (degrees) between a voxel axis and its nearest world axis."""
  return float(np.degrees(np.max(nib.affines.obliquity(np.asarray(affine, np.float64)))))


def is_oblique(shape: Sequence[int], affine: np.ndarray) -> bool:
  """Whether reorienting alone would misplace voxels of (shape, affine) by more than
  `OBLIQUE_TOLERANCE_VOXELS` of the smallest voxel edge (then resample: `aligned_grid`)."""
  tolerance = OBLIQUE_TOLERANCE_VOXELS * float(np.min(voxel_size(affine)))
  return obliquity_mm(shape, affine) > tolerance


def aligned_grid(
    shape: Sequence[int], affine: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray]:
  """An axis-aligned RAS+ grid covering the field of view of (shape, affine), same voxel sizes.

  Each voxel axis keeps its edge length on the world axis nearest to it; the grid is nibabel's
  `resample_to_output` grid (`spaces.vox2out_vox`) for those sizes. Returns (shape, affine).
  """
  affine = np.asarray(affine, np.float64)
  sizes = np.empty(3)
  for i, (axis, _) in enumerate(canonical_orientation(affine)):
    sizes[int(axis)] = voxel_size(affine)[i]
  out_shape, out_affine = spaces.vox2out_vox(
      (tuple(int(s) for s in shape[:3]), affine), tuple(float(v) for v in sizes))
  return tuple(int(v) for v in out_shape), np.asarray(out_affine, np.float64)

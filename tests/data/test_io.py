"""Tests for medjax.data.io against raw-byte parsing, nibabel/pynrrd writers and closed forms."""

import gzip
import struct

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medjax.data import io


def _affine(spacing=(1.0, 2.0, 3.0), origin=(-10.0, 5.0, 7.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _write_nii(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), str(path))
    return path


def _read_nifti1_bytes(path):
    """Independent NIfTI-1 reader: the header fields by offset, then the raw voxel bytes."""
    raw = open(path, "rb").read()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    codes = {4: "i2", 16: "f4", 2: "u1", 8: "i4", 512: "u2"}
    dtype = np.dtype(endian + codes[datatype])
    shape = dims[1 : 1 + dims[0]]
    count = int(np.prod(shape))
    flat = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset)
    return flat.reshape(shape, order="F"), dtype


def test_big_endian_real_scan(shared_data, tmp_path):
    path = shared_data / "monai" / "anatomical.nii"
    ref, dtype = _read_nifti1_bytes(path)
    assert dtype == np.dtype(">i2")  # the fixture really is big-endian int16
    img = io.load_image(path)
    assert img.array.dtype == np.float32 and img.array.dtype.isnative
    assert img.array.shape == (*ref.shape, 1)
    np.testing.assert_array_equal(img.array[..., 0], ref.astype(np.float32))
    assert img.orientation == ("L", "A", "S")
    assert img.spacing == (2.0, 2.0, 2.0)
    # round trip keeps values and affine, and writes native byte order
    out = io.save_image(tmp_path / "rt.nii.gz", img.array, like=img)
    back = io.load_image(out)
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.affine, img.affine)
    assert back.header.endianness == nib.volumeutils.native_code
    lab = io.load_label(shared_data / "monai" / "anatomical_label.nii.gz", label_map=[0, 1])
    io.check_pair(img, lab)
    assert lab.array.dtype == np.int32 and set(np.unique(lab.array)) <= {0, 1}


def test_roundtrip_float_int_and_4d(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 6, 7)).astype(np.float32)
    p = _write_nii(tmp_path / "a.nii.gz", vol)
    img = io.load_image(p)
    assert img.array.shape == (5, 6, 7, 1)
    np.testing.assert_array_equal(img.array[..., 0], vol)
    np.testing.assert_allclose(img.affine, _affine())
    assert img.spacing == (1.0, 2.0, 3.0)

    labels = rng.integers(0, 4, size=(5, 6, 7))
    q = io.save_image(tmp_path / "lab.nii", labels, like=p)
    assert nib.load(q).get_data_dtype() == np.uint8
    np.testing.assert_allclose(nib.load(q).affine, _affine())
    np.testing.assert_array_equal(io.load_label(q).array, labels)

    series = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    p4 = _write_nii(tmp_path / "t.nii.gz", series)
    img4 = io.load_image(p4)
    assert img4.array.shape == (4, 5, 6, 3)
    np.testing.assert_array_equal(img4.array, series)
    with pytest.raises(ValueError, match=r"t\.nii\.gz.*expected a 3D array, got a 4D"):
        io.load_image(p4, ndim=3)
    r4 = io.save_image(tmp_path / "t_out.nii.gz", img4.array, like=img4)
    np.testing.assert_array_equal(io.load_image(r4).array, series)

    big = np.array([[[-40000, 0], [1, 2]]], dtype=np.int64)
    r = io.save_image(tmp_path / "big.nii.gz", big, affine=np.eye(4))
    assert nib.load(r).get_data_dtype() == np.int32
    with pytest.raises(ValueError, match="like's spatial shape"):
        io.save_image(tmp_path / "bad.nii.gz", np.zeros((5, 6, 8)), like=img)
    with pytest.raises(ValueError, match="path"):
        io.save_image(tmp_path / "bad.png", vol)


@pytest.mark.parametrize("suffix", [".mgz", ".nrrd", ".hdr", ".img", ".nii"])
@pytest.mark.parametrize("kind", ["image", "label", "channels"])
def test_save_load_round_trip_every_format(tmp_path, suffix, kind):
    rng = np.random.default_rng(0)
    # a flip and anisotropic voxels (Analyze holds no rotation); the NIfTI/MGH/NRRD case also rotates
    affine = np.diag([-1.5, 1.0, 2.5, 1.0])
    affine[:3, 3] = [30.0, -12.0, 4.5]
    if suffix in (".hdr", ".img"):
        # Analyze: no rotation, the x flip of nibabel's SPM reading, and the origin at a whole
        # voxel (2, 3, 1) inside the volume
        affine = np.diag([-1.5, 1.0, 2.5, 1.0])
        affine[:3, 3] = [3.0, -3.0, -2.5]
    else:
        c, s_ = np.cos(0.3), np.sin(0.3)
        affine[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    shape = (5, 6, 4)
    if kind == "label":
        array = rng.integers(0, 5, shape).astype(np.int32)
    elif kind == "channels":
        array = rng.normal(size=(*shape, 3)).astype(np.float32)
    else:
        array = rng.normal(size=shape).astype(np.float32)
    out = io.save_image(tmp_path / f"x{suffix}", array, affine=affine)
    back = io.load_image(out, is_label=kind == "label")
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    expected = array if kind != "image" else array[..., None]
    np.testing.assert_array_equal(back.array, expected)
    assert back.spacing == pytest.approx((1.5, 1.0, 2.5), abs=1e-5)


def test_save_analyze_refuses_rotation(tmp_path):
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"Analyze \(.hdr/.img\) stores only voxel sizes"):
        io.save_image(tmp_path / "x.hdr", np.zeros((3, 3, 3), np.float32), affine=rot)
    half = np.eye(4)
    half[0, 3] = 0.5  # an origin between voxels
    with pytest.raises(ValueError, match="write NIfTI instead"):
        io.save_image(tmp_path / "x.img", np.zeros((3, 3, 3), np.float32), affine=half)


def test_corrupt_truncated_missing(tmp_path):
    vol = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    p = _write_nii(tmp_path / "ok.nii.gz", vol)
    raw = open(p, "rb").read()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(io.DataFileError, match="trunc.nii.gz"):
        io.load_image(bad)
    short = tmp_path / "short.nii"
    short.write_bytes(gzip.decompress(raw)[:1000])
    with pytest.raises(ValueError, match="short.nii"):
        io.load_image(short)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a gzip stream at all")
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        io.load_image(garbage)
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        io.load_image(tmp_path / "missing.nii")
    with pytest.raises(ValueError, match="unsupported"):
        io.load_image(tmp_path / "x.png")


def test_nonfinite_and_label_validation(tmp_path):
    vol = np.ones((4, 4, 4), np.float32)
    vol[1, 2, 3] = np.nan
    vol[0, 0, 0] = np.inf
    p = _write_nii(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(ValueError, match=r"nan.nii.gz: 2 non-finite"):
        io.load_image(p)
    lab = np.zeros((4, 4, 4), np.int16)
    lab[0, 0, 0] = 7
    q = _write_nii(tmp_path / "lab.nii.gz", lab)
    with pytest.raises(ValueError, match=r"lab.nii.gz: label value\(s\) \[7\]"):
        io.load_label(q, label_map={0: 0, 1: 1})
    lab[0, 0, 0] = 10
    lab[1, 1, 1] = 250
    q = _write_nii(tmp_path / "lab2.nii.gz", lab)
    got = io.load_label(q, label_map={0: 0, 10: 1, 150: 2, 250: 3}).array
    expected = np.zeros((4, 4, 4), np.int32)
    expected[0, 0, 0], expected[1, 1, 1] = 1, 3
    np.testing.assert_array_equal(got, expected)
    frac = _write_nii(tmp_path / "frac.nii.gz", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="frac.nii.gz: label volume has non-integer"):
        io.load_label(frac)


def test_check_pair(tmp_path):
    a = io.load_image(_write_nii(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32)))
    b = io.load_label(_write_nii(tmp_path / "b.nii.gz", np.zeros((4, 5, 7), np.int16)))
    with pytest.raises(ValueError, match=r"b.nii.gz vs .*a.nii.gz: spatial shapes"):
        io.check_pair(a, b)
    shifted = _affine(origin=(-10.0, 5.0, 7.5))
    c = io.load_label(_write_nii(tmp_path / "c.nii.gz", np.zeros((4, 5, 6), np.int16), shifted))
    with pytest.raises(ValueError, match="affines disagree by up to 0.5"):
        io.check_pair(a, c)
    io.check_pair(a, c, atol=0.6)


def test_analyze_and_mgh(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.int16)
    hdr_path = tmp_path / "subject-1-T1.hdr"
    ana = nib.AnalyzeImage(vol, np.diag([1.5, 1.5, 2.0, 1.0]))
    nib.save(ana, str(hdr_path))
    assert (tmp_path / "subject-1-T1.img").is_file()
    img = io.load_image(hdr_path)
    np.testing.assert_array_equal(img.array[..., 0], vol.astype(np.float32))
    np.testing.assert_allclose(img.spacing, (1.5, 1.5, 2.0))
    np.testing.assert_allclose(img.affine, nib.load(str(hdr_path)).affine)
    # a prediction written "like" the Analyze file overlays it
    out = io.save_image(tmp_path / "pred.nii.gz", (vol > 500).astype(np.int32), like=img)
    np.testing.assert_allclose(nib.load(out).affine, img.affine)

    mgh_aff = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    nib.save(nib.MGHImage(vol.astype(np.float32), mgh_aff), str(tmp_path / "orig.mgz"))
    m = io.load_image(tmp_path / "orig.mgz")
    np.testing.assert_array_equal(m.array[..., 0], vol)
    np.testing.assert_allclose(m.affine, mgh_aff)
    assert m.orientation == ("L", "I", "A")


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
def test_nrrd_lps_to_ras(tmp_path, suffix):
    rng = np.random.default_rng(2)
    vol = rng.integers(-1000, 1000, size=(5, 6, 4)).astype(np.int16)
    dirs = np.array([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 2.5]])
    origin = np.array([-100.0, -120.0, 30.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": dirs,
        "space origin": origin,
    }
    path = tmp_path / f"img{suffix}"
    nrrd.write(str(path), vol, header, detached_header=suffix == ".nhdr")
    img = io.load_image(path)
    np.testing.assert_array_equal(img.array[..., 0], vol)
    for idx in [(0, 0, 0), (4, 5, 3), (1, 2, 3)]:
        lps = origin + np.asarray(idx) @ dirs
        ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(img.affine @ np.array([*idx, 1.0]), [*ras, 1.0], atol=1e-9)
    assert img.orientation == ("L", "P", "S")
    np.testing.assert_allclose(img.spacing, (0.9, 0.8, 2.5))
    # a vector axis first (no direction) becomes the channel axis
    vec = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    header_vec = dict(header, **{"space directions": np.vstack([np.full(3, np.nan), dirs])})
    header_vec["kinds"] = ["vector", "domain", "domain", "domain"]
    nrrd.write(str(tmp_path / "vec.nrrd"), vec, header_vec)
    v = io.load_image(tmp_path / "vec.nrrd")
    assert v.array.shape == (5, 6, 4, 2)
    np.testing.assert_array_equal(v.array, np.moveaxis(vec, 0, -1))
    np.testing.assert_allclose(v.affine, img.affine)
    # writing a prediction like the NRRD path keeps its RAS geometry
    out = io.save_image(tmp_path / "pred.nii.gz", np.zeros((5, 6, 4), np.uint8), like=path)
    np.testing.assert_allclose(nib.load(out).affine, img.affine)
    trunc = tmp_path / "trunc.nrrd"
    trunc.write_bytes(open(tmp_path / "vec.nrrd", "rb").read()[:-50])
    with pytest.raises(ValueError, match="trunc.nrrd"):
        io.load_image(trunc)


def test_reorient_preserves_world_coordinates(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(4, 5, 6)).astype(np.float32)
    # voxel axes point to P, I, L: a permutation and two flips away from RAS
    aff = np.array([[0, 0, -2.0, 20.0], [-1.5, 0, 0, 10.0], [0, -3.0, 0, -5.0], [0, 0, 0, 1.0]])
    p = _write_nii(tmp_path / "pil.nii.gz", vol, aff)
    img = io.load_image(p)
    assert img.orientation == ("P", "I", "L")
    ras = io.load_image(p, reorient=True)
    assert ras.orientation == ("R", "A", "S")
    assert ras.array.shape == (6, 4, 5, 1)  # R <- axis 2, A <- axis 0, S <- axis 1
    np.testing.assert_allclose(ras.spacing, (2.0, 1.5, 3.0))
    inv = np.linalg.inv(aff)
    for idx in np.ndindex(*ras.array.shape[:3]):
        world = ras.affine @ np.array([*idx, 1.0])
        old = np.rint(inv @ world)[:3].astype(int)
        assert ras.array[idx][0] == vol[tuple(old)]


def test_resample_closed_form(tmp_path):
    x, y, z = np.meshgrid(np.arange(8.0), np.arange(6.0), np.arange(4.0), indexing="ij")
    ramp = (2.0 * x + 0.5 * y - z).astype(np.float32)
    aff = _affine(spacing=(1.0, 1.0, 2.0))
    p = _write_nii(tmp_path / "ramp.nii.gz", ramp, aff)
    img = io.load_image(p, spacing=(2.0, 0.5, 2.0))
    assert img.array.shape == (4, 12, 4, 1)
    assert img.spacing == (2.0, 0.5, 2.0)
    j = np.stack(np.meshgrid(*[np.arange(s) for s in img.array.shape[:3]], indexing="ij"), -1)
    old = j * np.array([2.0, 0.5, 1.0])  # old voxel coordinate of every new voxel
    old = np.minimum(old, np.array([7.0, 5.0, 3.0]))  # border clamp beyond the last voxel
    expected = 2.0 * old[..., 0] + 0.5 * old[..., 1] - old[..., 2]
    np.testing.assert_allclose(img.array[..., 0], expected, atol=1e-5)
    # world position of a new voxel = world position of the old coordinate it samples
    for idx in [(1, 3, 2), (3, 7, 1)]:
        o = np.array(idx) * np.array([2.0, 0.5, 1.0])
        np.testing.assert_allclose(img.affine @ [*idx, 1.0], aff @ [*o, 1.0])
    lab = (x > 3).astype(np.int16) * 2
    q = _write_nii(tmp_path / "lab.nii.gz", lab, aff)
    rl = io.load_label(q, spacing=(2.0, 0.5, 2.0), label_map=[0, 2])
    assert rl.array.dtype == np.int32 and set(np.unique(rl.array)) == {0, 2}
    np.testing.assert_array_equal(rl.array, (2 * j[..., 0] > 3).astype(np.int32) * 2)
    with pytest.raises(ValueError, match="spacing"):
        io.load_image(p, spacing=(1.0, -1.0, 1.0))


def test_unresample_inverts_resample_image(tmp_path):
    """Labels resampled to another spacing and brought back with unresample: the original labels
    where nearest neighbour can recover them (finer in every axis), and the closed form voxel by
    voxel (original voxel i samples resampled coordinate i * old / new)."""
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (6, 5, 4)).astype(np.int16)
    aff = _affine(spacing=(1.0, 2.0, 3.0))
    img = io.load_label(_write_nii(tmp_path / "l.nii.gz", lab, aff))
    fine = io.resample_image(img, (0.5, 1.0, 1.0))  # 2x, 2x, 3x finer
    back = io.unresample(fine.array, img.spatial_shape, img.spacing, fine.spacing)
    np.testing.assert_array_equal(back, lab)
    coarse = io.resample_image(img, (3.0, 2.0, 9.0))  # no voxel centre half-way: no ties
    back = io.unresample(coarse.array, img.spatial_shape, img.spacing, coarse.spacing)
    for i, j, k in np.ndindex(*lab.shape):
        src = np.minimum(
            np.floor(np.array([i / 3.0, j, k / 3.0]) + 0.5).astype(int),
            np.array(coarse.array.shape) - 1,
        )
        assert back[i, j, k] == coarse.array[tuple(src)]
    same = np.zeros((6, 5, 4), np.int32)
    assert io.unresample(same, (6, 5, 4), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0)) is same


def test_resample_to_matches_nibabel_and_keeps_the_target_grid(tmp_path):
    """resample_to brings an image onto another grid through both affines (world space)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from medjax.data.io import load_image, resample_to, same_grid

    rng = np.random.default_rng(0)
    a_aff = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -10.0], [0, 0, 3.0, 4.0], [0, 0, 0, 1]])
    b_aff = np.array([[1.5, 0.2, 0, -5.0], [0, 1.5, 0, 2.0], [0.1, 0, 2.0, 1.0], [0, 0, 0, 1]])
    data = rng.normal(size=(12, 14, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, a_aff), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((10, 11, 8), np.float32), b_aff), str(tmp_path / "b.nii.gz"))
    a, b = load_image(tmp_path / "a.nii.gz"), load_image(tmp_path / "b.nii.gz")
    out = resample_to(a, b)
    assert (
        out.spatial_shape == (10, 11, 8) and np.allclose(out.affine, b.affine) and same_grid(out, b)
    )
    ref = resample_from_to(
        nib.load(str(tmp_path / "a.nii.gz")),
        nib.load(str(tmp_path / "b.nii.gz")),
        order=1,
        mode="constant",
        cval=0.0,
    )
    np.testing.assert_allclose(out.array[..., 0], np.asarray(ref.dataobj), atol=1e-4)
    assert not same_grid(a, b) and same_grid(a, a)
    with pytest.raises(ValueError, match="like"):
        resample_to(a, a.replace(array=np.zeros((4, 4, 1), np.float32), affine=np.eye(3)))


def test_reorient_to_any_codes_and_back(tmp_path):
    rng = np.random.default_rng(4)
    vol = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)  # two channels ride along
    aff = np.array([[0, 0, -2.0, 20.0], [-1.5, 0, 0, 10.0], [0, -3.0, 0, -5.0], [0, 0, 0, 1.0]])
    img = io.Image(
        array=vol, affine=aff, spacing=(1.5, 3.0, 2.0), orientation=("P", "I", "L"), path="x"
    )
    for codes in (("A", "I", "L"), ("R", "A", "S"), ("l", "p", "s"), ("P", "I", "L")):
        out = io.reorient(img, codes)
        assert out.orientation == tuple(c.upper() for c in codes)
        inv = np.linalg.inv(aff)
        for idx in np.ndindex(*out.array.shape[:3]):  # every voxel keeps its world position
            old = np.rint(inv @ (out.affine @ np.array([*idx, 1.0])))[:3].astype(int)
            np.testing.assert_array_equal(out.array[idx], vol[tuple(old)])
        np.testing.assert_array_equal(io.orient_back(out.array, aff, codes), vol)
        np.testing.assert_array_equal(io.orient_back(out.array[..., 0], aff, codes), vol[..., 0])
    with pytest.raises(ValueError, match="R/L, A/P and S/I"):
        io.reorient(img, ("R", "L", "S"))

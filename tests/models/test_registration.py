"""Rigid alignment of a prior CT to the current one, on real anatomy (LIDC-IDRI-0001)."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lungscreen.models.registration import AlignmentImage, RigidTransform, align, alignment_image

LUNA16_NODULE_LPS = np.array([56.21, 86.34, -115.87])  # LIDC-IDRI-0001's 23 mm nodule (LUNA16)


@pytest.fixture(scope="module")
def lidc_alignment_image(lidc_series_dir):
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    series = index_study(sorted(lidc_series_dir.glob("*.dcm"))).series[0]
    volume = read_series_volume(series.paths, headers=series.headers, frames=series.frames)
    return alignment_image(volume.voxels, volume.affine)


def moved(image: AlignmentImage, true: RigidTransform) -> AlignmentImage:
    """The 'prior': the same anatomy where the patient lay ``true``-inverse away, on the same
    grid less the slices that would reach beyond the scanned range (a real prior has none there)."""
    grid = np.argwhere(np.ones(image.hu.shape, dtype=bool))
    prior_lps = grid @ image.affine[:3, :3].T + image.affine[:3, 3]
    current_index = (true.apply(prior_lps) - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
    hu = ndimage.map_coordinates(image.hu, current_index.T, order=1, mode="nearest").reshape(image.hu.shape)
    k = current_index[:, 0].reshape(image.hu.shape)
    scanned = np.flatnonzero(((k >= 0) & (k <= image.hu.shape[0] - 1)).all(axis=(1, 2)))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ [scanned[0], 0, 0] + image.affine[:3, 3]
    return AlignmentImage(hu[scanned[0] : scanned[-1] + 1].astype(np.float32), affine)


def test_the_coarse_image_keeps_patient_coordinates(lidc_alignment_image):
    image = lidc_alignment_image
    assert image.hu.shape == (66, 85, 85)  # 2.5 mm x 0.7 mm voxels, blocks of 2 x 6 x 6: about 4-5 mm
    # The first block's centre is the mean of the centres of the voxels it averages (columns and rows 0 and 3).
    assert np.allclose(image.affine[:3, 3], [-166.0 + 1.5 * 0.703125, -171.7 + 1.5 * 0.703125, -340.0 + 1.25], atol=0.01)
    assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), [5.0, 6 * 0.703125, 6 * 0.703125])
    again = AlignmentImage.from_bytes(image.to_bytes())
    assert np.array_equal(again.affine, image.affine) and np.abs(again.hu - image.hu).max() <= 0.5


@pytest.mark.parametrize("degrees, shift_mm", [((2.0, -3.0, 4.0), (6.0, -4.0, 9.0)), ((-4.0, 2.0, -2.0), (-10.0, 7.0, -5.0))])
def test_a_rotated_and_shifted_prior_is_brought_back_within_3_mm(lidc_alignment_image, degrees, shift_mm):
    current = lidc_alignment_image
    true = RigidTransform(Rotation.from_euler("xyz", degrees, degrees=True).as_matrix(), np.array(shift_mm), np.array([0.0, 0.0, -175.0]))
    prior = moved(current, true)
    alignment = align(prior, current)
    assert alignment.lungs_found and alignment.method == "intensity"
    points = np.array([LUNA16_NODULE_LPS, [-80.0, 0.0, -200.0], [0.0, 50.0, -60.0]])
    in_prior = true.inverse_apply(points)
    errors = np.linalg.norm(alignment.transform.apply(in_prior) - points, axis=1)
    unaligned = np.linalg.norm(in_prior - points, axis=1)
    assert errors.max() < 3.0, errors
    assert errors.max() < unaligned.min() / 2
    assert alignment.residual_mm < 4.0


def test_a_prior_scanned_over_a_shorter_range_and_shifted_along_the_table_is_aligned(lidc_alignment_image):
    """Real priors often cover another range: here 40 mm less at the lung apices and the patient
    25 mm further along the table, so the lungs' centres of mass disagree by over 15 mm."""
    current = lidc_alignment_image
    true = RigidTransform(Rotation.from_euler("xyz", (1.0, -2.0, 2.0), degrees=True).as_matrix(),
                          np.array([4.0, -3.0, 25.0]), np.array([0.0, 0.0, -175.0]))
    full = moved(current, true)
    cut = int(round(40.0 / np.linalg.norm(full.affine[:3, 0])))
    prior = AlignmentImage(full.hu[:-cut], full.affine)  # k runs foot to head: the top slices dropped
    alignment = align(prior, current)
    points = np.array([LUNA16_NODULE_LPS, [-80.0, 0.0, -200.0], [0.0, 50.0, -250.0]])
    errors = np.linalg.norm(alignment.transform.apply(true.inverse_apply(points)) - points, axis=1)
    assert alignment.method == "intensity" and errors.max() < 3.0, errors
    assert alignment.residual_mm < 4.0  # over the range both scans cover


def test_a_deeper_breath_leaves_the_nodule_within_the_matching_gate(lidc_alignment_image):
    """The prior at another inspiration: lungs 5 % longer about the lung bases (an affine, not a
    rigid, change). The rigid fit cannot undo it, but the nodule lands within a few mm."""
    current = lidc_alignment_image
    base_z = -300.0
    grid = np.argwhere(np.ones(current.hu.shape, dtype=bool))
    prior_lps = grid @ current.affine[:3, :3].T + current.affine[:3, 3]
    in_current = prior_lps.copy()
    in_current[:, 2] = base_z + (prior_lps[:, 2] - base_z) / 1.05
    index = (in_current - current.affine[:3, 3]) @ np.linalg.inv(current.affine[:3, :3]).T
    hu = ndimage.map_coordinates(current.hu, index.T, order=1, mode="nearest").reshape(current.hu.shape)
    prior = AlignmentImage(hu.astype(np.float32), current.affine.copy())
    alignment = align(prior, current)
    nodule_in_prior = LUNA16_NODULE_LPS.copy()
    nodule_in_prior[2] = base_z + (nodule_in_prior[2] - base_z) * 1.05
    error = np.linalg.norm(alignment.transform.apply(nodule_in_prior[None])[0] - LUNA16_NODULE_LPS)
    unaligned = np.linalg.norm(nodule_in_prior - LUNA16_NODULE_LPS)
    assert error < 5.0 and error < unaligned, (error, unaligned)


def test_the_inverse_undoes_the_transform():
    t = RigidTransform(Rotation.from_euler("z", 10, degrees=True).as_matrix(), np.array([1.0, 2.0, 3.0]), np.array([5.0, 0.0, 0.0]))
    p = np.array([[10.0, -20.0, 30.0]])
    assert np.allclose(t.inverse_apply(t.apply(p)), p)
    assert t.rotation_deg == pytest.approx(10.0)


def test_without_lungs_the_scanner_coordinates_are_kept():
    air_free = AlignmentImage(np.zeros((10, 10, 10), np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    alignment = align(air_free, air_free)
    assert not alignment.lungs_found and np.allclose(alignment.transform.rotation, np.eye(3))

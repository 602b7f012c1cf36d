"""The pieces `lungscreen evaluate-followup` builds its pairs from (benchmarks/followup.py).

Each piece is checked on its own, on small volumes or one real scan; the evaluation itself
(analyses of every pair) is too slow for a test and is run by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lungscreen.benchmarks.followup import (
    PairResult, TruthNodule, _Scans, apply_affine, axial_lps, breathing_matrix, crop_top, resample_prior,
    rigid_matrix, rigid_transform, shrink_real_nodule, summarize, thick_slices,
)
from lungscreen.findings import ChangeLabel
from lungscreen.server.cli import main


def _grid(shape, spacing, origin=(0.0, 0.0, 0.0)):
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = (*spacing, 1.0)
    affine[:3, 3] = origin
    return np.full(shape, -860.0, dtype=np.float32), affine


def test_a_shrunk_nodule_stays_inside_its_mask_and_loses_the_volume_the_truth_says():
    hu, affine = _grid((12, 80, 80), (5.0, 0.6, 0.6))
    # a 14 mm solid nodule (20 HU) with exact partial volume: each voxel's share of the sphere
    k, j, i = np.indices(hu.shape)
    offsets = (np.arange(10) + 0.5) / 10 - 0.5  # ten sub-slices per 5 mm slice
    share = np.mean([np.hypot((k + o - 5.3) * 5.0, np.hypot((j - 40.2) * 0.6, (i - 39.7) * 0.6)) <= 7.0 for o in offsets], axis=0)
    hu += (880.0 * share).astype(np.float32)
    mask = share >= 0.5  # the nodule as a reader would outline it
    shrunk = shrink_real_nodule(hu, affine, mask, 2.0, np.random.default_rng(0))

    assert not (shrunk.hu[~mask] > -600).any()  # no soft tissue left outside the old mask
    assert (shrunk.hu[mask] > -500).any()  # the core is still there (5 mm slices: partly filled)
    assert (shrunk.hu <= hu + 1e-3).all()  # nothing denser than it was
    # Eroding by 2 mm takes 4 mm off the long axis of a round nodule (within a voxel's reach)
    assert shrunk.growth_mm == pytest.approx(4.0, abs=0.6)
    assert shrunk.equivalent_diameter_mm[0] - shrunk.equivalent_diameter_mm[1] == pytest.approx(4.0, abs=0.6)
    # The prior's nodule content (its HU above the lung, as a share of solid nodule) is the
    # volume of the truth's smaller shape.
    voxel_mm3 = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    content = lambda volume: float(np.clip((volume + 860.0) / 880.0, 0, 1).sum()) * voxel_mm3  # noqa: E731
    sphere = lambda d: np.pi / 6 * d**3  # noqa: E731
    assert content(hu) == pytest.approx(sphere(14.0), rel=0.02)
    assert content(shrunk.hu) == pytest.approx(sphere(shrunk.equivalent_diameter_mm[1]), rel=0.15)
    assert hu[mask].max() > -300  # the input is left as it was
    assert shrink_real_nodule(hu, affine, mask, 50.0, np.random.default_rng(0)).long_axis_mm[1] == 0.0


def test_shrinking_lung1s_real_nodule_keeps_its_core_inside_the_mask(shared_data):
    hu, affine, mask = _Scans(shared_data, shared_data).lung1
    assert hu.shape == (48, 512, 512) and mask.sum() == 837
    shrunk = shrink_real_nodule(hu, affine, mask, 2.0, np.random.default_rng(0))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    around = ndimage.distance_transform_edt(~mask, sampling=spacing) <= 3.0  # the mask and 3 mm about it
    soft = (shrunk.hu > -300) & around
    assert soft.any() and not (soft & ~mask).any()
    kept = np.abs(shrunk.hu[mask] - hu[mask]) / np.abs(hu[mask] + 850.0)  # the share of its contrast over the lung lost
    assert np.count_nonzero(kept < 0.1) > 20  # the core: its own voxels, within 10 % of their contrast
    assert 3.0 < shrunk.growth_mm < 6.0 and shrunk.long_axis_mm[1] > 8.0
    removed = shrink_real_nodule(hu, affine, mask, 50.0, np.random.default_rng(0))
    assert not (removed.hu[around] > -600).any()


def test_the_breathing_prior_shows_a_point_where_the_truth_map_says():
    hu, affine = _grid((60, 64, 64), (2.5, 1.5, 1.5), origin=(-48.0, -48.0, -150.0))
    apex_z = -10.0
    move = rigid_matrix(rigid_transform((2.0, -1.0, 3.0), (3.0, -2.0, 4.0), (0.0, 0.0, -75.0))) @ breathing_matrix(apex_z, 0.955)
    # the apex stays, a point 100 mm below it was 95.5 mm below it in the prior
    stretch = breathing_matrix(apex_z, 0.955)
    assert apply_affine(stretch, (5.0, 6.0, apex_z)) == pytest.approx((5.0, 6.0, apex_z))
    assert apply_affine(stretch, (5.0, 6.0, apex_z - 95.5))[2] == pytest.approx(apex_z - 100.0)

    spot = np.array([6.0, -9.0, -110.0])
    index = (spot - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    grid = np.indices(hu.shape).reshape(3, -1).T
    distance = np.linalg.norm((grid - index) * np.linalg.norm(affine[:3, :3], axis=0), axis=1)
    hu += (np.exp(-0.5 * (distance / 3.0) ** 2) * 900.0).reshape(hu.shape).astype(np.float32)
    prior, prior_affine = resample_prior(hu, affine, move)
    weight = np.clip(prior + 860.0, 0, None)
    centre_index = (np.indices(prior.shape).reshape(3, -1) * weight.ravel()).sum(axis=1) / weight.sum()
    seen = prior_affine[:3, :3] @ centre_index + prior_affine[:3, 3]
    assert np.linalg.norm(apply_affine(move, seen) - spot) < 0.5
    assert prior.shape[0] < hu.shape[0]  # slices that would reach beyond the scanned range are dropped


def test_rigid_matrix_is_the_rigid_transform():
    transform = rigid_transform((2.0, -3.0, 4.0), (6.0, -4.0, 9.0), (0.0, 0.0, -175.0))
    points = np.array([[56.21, 86.34, -115.87], [-40.0, 10.0, -250.0]])
    assert apply_affine(rigid_matrix(transform), points) == pytest.approx(transform.apply(points))


@pytest.mark.parametrize("z_step", [2.5, -2.5])
def test_a_thick_prior_averages_slice_pairs_at_their_mean_position_and_loses_its_top(z_step):
    hu, affine = _grid((133, 4, 4), (z_step, 0.7, 0.7), origin=(0.0, 0.0, -340.0))
    hu[:] = np.arange(133, dtype=np.float32)[:, None, None]
    thick, thick_affine = thick_slices(hu, affine, 2)
    assert thick.shape[0] == 66 and thick_affine[2, 0] == pytest.approx(2 * z_step)
    z = lambda a, k: a[2, 0] * k + a[2, 3]  # noqa: E731
    for k in (0, 40, 65):
        assert thick[k, 0, 0] == pytest.approx((hu[2 * k, 0, 0] + hu[2 * k + 1, 0, 0]) / 2)
        assert z(thick_affine, k) == pytest.approx((z(affine, 2 * k) + z(affine, 2 * k + 1)) / 2)
    cropped, cropped_affine = crop_top(thick, thick_affine, 20.0)
    assert cropped.shape[0] == 62  # 4 slices of 5 mm
    top = max(z(thick_affine, k) for k in range(66))
    assert max(z(cropped_affine, k) for k in range(62)) == pytest.approx(top - 20.0)
    assert min(z(cropped_affine, k) for k in range(62)) == pytest.approx(min(z(thick_affine, k) for k in range(66)))


def test_axial_lps_flips_axes_that_run_backwards_and_refuses_oblique_ones():
    voxels = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    _, affine = _grid((3, 4, 5), (2.0, 0.8, 0.7), origin=(-10.0, -20.0, -30.0))
    flipped = np.flip(voxels, axis=(0, 2))
    flipped_affine = affine.copy()  # the same scan, stored with k and i reversed
    flipped_affine[:3, 3] = affine[:3, :3] @ [2, 0, 4] + affine[:3, 3]
    flipped_affine[:3, 0] *= -1
    flipped_affine[:3, 2] *= -1
    back, back_affine = axial_lps(flipped, flipped_affine)
    assert np.array_equal(back, voxels) and back_affine == pytest.approx(affine)
    oblique = affine.copy()
    oblique[:3, :3] = affine[:3, :3] @ rigid_transform((0.0, 0.0, 20.0), (0, 0, 0), (0, 0, 0)).rotation
    with pytest.raises(ValueError, match="not along"):
        axial_lps(voxels, oblique)


def test_the_summary_totals_real_and_synthetic_nodule_pairs_apart():
    def result(name, synthetic, findings, right, labels, growth, alignment, shares):
        r = PairResult(name, synthetic, (TruthNodule((0.0, 0.0, 0.0), ChangeLabel.GROWING, 3.0),), findings, right,
                       truth_found=1, truth_total=1, labels_right=labels, growth_errors_mm=growth, alignment_error_mm=alignment)
        r.compare_s, r.analysis_s = [s for s in shares], [1.0] * len(shares)
        return r

    summary = summarize([
        result("a", False, 2, 2, 1, [0.4], 1.2, [0.2, 0.3, 0.4]),
        result("b", False, 1, 0, 1, [1.3], 2.5, [0.1, 0.1, 0.1]),
        result("s", True, 3, 3, 3, [0.2, 0.6], 0.9, [0.5]),
    ])
    assert list(summary["pairs"]) == ["a", "b", "s"] and summary["pairs"]["a"]["truth"] == [{"change": "growing", "growth_mm": 3.0}]
    real, synthetic = summary["totals"]["real_nodules"], summary["totals"]["synthetic_nodules"]
    assert real == {"pairs": 2, "matched_right": "2/3", "labels_right": "2/3", "truth_found": "2/2", "resolved_wrongly": 0,
                    "growth_error_mm_max": 1.3, "alignment_error_mm_max": 2.5, "compare_share_median": 0.15}
    assert synthetic["matched_right"] == "3/3" and synthetic["growth_error_mm_max"] == 0.6 and synthetic["pairs"] == 1


def test_an_unknown_pair_name_is_refused_before_anything_is_built(capsys):
    assert main(["evaluate-followup", "--pairs", "lidc-growing,no-such-pair"]) == 2
    assert "no-such-pair" in capsys.readouterr().err


def test_the_lung1_priors_are_5_mm_series_that_pass_selection_and_show_the_nodule_where_the_truth_says(shared_data, tmp_path):
    """lung1 has 48 slices of 5 mm: after the rigid motion drops the slices that would reach beyond
    the scan, each prior must still be chosen by the default series rules (at most 5 mm, 30 slices),
    and the truth map must carry the nodule's centre onto its (shrunk) core, or onto lung where
    it was removed."""
    from lungscreen.benchmarks.followup import make_pairs
    from lungscreen.dicom_io.select import SelectionRules, choose_series
    from lungscreen.dicom_io.study import index_study
    from lungscreen.dicom_io.volume import read_series_volume

    growing, new = make_pairs(tmp_path, shared_data, ("lung1-new", "lung1-growing"))
    assert growing.name == "lung1-growing" and new.name == "lung1-new" and growing.current_dir == new.current_dir
    assert new.truth[0].change is ChangeLabel.NEW and new.truth[0].growth_mm is None
    assert growing.truth[0].change is ChangeLabel.GROWING and 3.0 < growing.truth[0].growth_mm < 6.0
    assert np.linalg.norm(np.array(new.truth[0].current_lps) - (-21.86, -120.54, -611.50)) < 0.1  # the mask's centroid
    assert choose_series(index_study(sorted(new.current_dir.iterdir())).series).selected is not None
    for pair, at_centre in ((growing, lambda hu: hu > -300), (new, lambda hu: hu < -600)):
        series = index_study(sorted(pair.prior_dir.iterdir())).series
        assert choose_series(series, SelectionRules()).selected is not None
        prior = read_series_volume(series[0].paths, headers=series[0].headers, frames=series[0].frames)
        assert 30 <= prior.voxels.shape[0] < 48 and np.linalg.norm(prior.affine[:3, 0]) == pytest.approx(5.0)
        centre = apply_affine(np.linalg.inv(pair.prior_to_current), pair.truth[0].current_lps)
        index = np.round(np.linalg.solve(prior.affine[:3, :3], centre - prior.affine[:3, 3])).astype(int)
        assert at_centre(prior.voxels[tuple(index)]), pair.name

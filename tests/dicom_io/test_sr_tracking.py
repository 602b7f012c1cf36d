"""Tracking Identifier and UID of each nodule across timepoints (TID 1500, TID 4108)."""

from dataclasses import replace

from lungscreen.dicom_io.sr import assign_tracking
from lungscreen.findings import Finding, NoduleType


def finding(**changes):
    return replace(Finding((0, 0, 0), (0, 0, 0), 6.0, 113.0, 0.9, NoduleType.SOLID, "3", True), **changes)


def test_matched_nodules_keep_the_priors_pair_and_new_ones_never_reuse_a_prior_identifier():
    matched = finding(tracking_uid="2.25.7", tracking_id="Nodule 2")
    tracked = assign_tracking([finding(), matched, finding()], "1.2.3.4", prior_ids=("Nodule 1", "Nodule 2", "Nodule 3"))
    assert tracked[1].tracking_uid == "2.25.7" and tracked[1].tracking_id == "Nodule 2"
    assert [t.tracking_id for t in (tracked[0], tracked[2])] == ["Nodule 4", "Nodule 5"]
    assert len({t.tracking_uid for t in tracked}) == 3


def test_a_baseline_keeps_the_uids_it_always_derived_from_the_sr():
    first = assign_tracking([finding(), finding()], "1.2.3.4")
    again = assign_tracking([finding(), finding()], "1.2.3.4")
    assert [t.tracking_id for t in first] == ["Nodule 1", "Nodule 2"]
    assert [t.tracking_uid for t in first] == [t.tracking_uid for t in again]  # a re-run of the same SR: same UIDs

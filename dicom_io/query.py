"""Finding and fetching a patient's prior CT in a PACS: C-FIND, then C-GET (PS3.4 C.4.1, C.4.3).

The Study Root Query/Retrieve Information Model at STUDY level: C-FIND for the patient's
CT studies (Patient ID with its Issuer, ModalitiesInStudy CT, StudyDate in a range), then
C-GET of one study over the same kind of association, its instances arriving as C-STORE
sub-operations on it (SCP role for the CT storage classes negotiated with SCP/SCU Role
Selection, PS3.7 D.3.3.4). C-GET needs no route back to LungScreen on the PACS (C-MOVE does).

Patient IDs are needed in the queries; they are never logged. :func:`patient_key` gives the
hash LungScreen keys its history with instead.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from lungscreen.dicom_io.send import Destination
from lungscreen.dicom_io.study import reference_header
from lungscreen.dicom_io.uids import is_valid_uid
from lungscreen.dicom_io.volume import CT_SOP_CLASSES
from lungscreen.errors import LungScreenError

log = logging.getLogger(__name__)


class PriorRetrievalError(LungScreenError):
    """The PACS could not be queried, or the prior study could not be retrieved in full."""


def patient_key(patient_id: str, issuer: str) -> str:
    """The key of a patient in LungScreen's history: a hash of Issuer of Patient ID and Patient ID
    (the same ID from two issuers is two patients)."""
    return hashlib.sha256(f"{issuer.strip()}\\{patient_id.strip()}".encode()).hexdigest()


@dataclass(frozen=True)
class StudyIdentity:
    """Who and when a study is, read from one of its CT headers."""

    study_uid: str
    study_date: str  # DA, "" when absent
    patient_id: str = field(repr=False)  # never in logs or reprs
    issuer: str = field(repr=False)

    @property
    def patient_key(self) -> str:
        return patient_key(self.patient_id, self.issuer)


@dataclass(frozen=True)
class InstanceIdentity:
    """The UIDs a job store records for one stored file."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def instance_identity(path: Path) -> InstanceIdentity:
    header = reference_header(path)
    return InstanceIdentity(path, str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                            str(header.get("SOPInstanceUID", "")), str(header.get("SOPClassUID", "")))


def study_identity(path: Path) -> StudyIdentity:
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
        "StudyInstanceUID", "StudyDate", "PatientID", "IssuerOfPatientID"])
    return StudyIdentity(
        study_uid=str(header.get("StudyInstanceUID", "")), study_date=str(header.get("StudyDate", "") or ""),
        patient_id=str(header.get("PatientID", "") or ""), issuer=str(header.get("IssuerOfPatientID", "") or ""),
    )


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    study_date: str


def _association(ae: AE, peer: Destination, timeout_s: float):
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except OSError as exc:
        raise PriorRetrievalError(f"the PACS {peer} could not be reached: {exc}") from exc
    if not assoc.is_established:
        raise PriorRetrievalError(f"the PACS {peer} refused or did not answer the association")
    return assoc


def find_ct_studies(
    peer: Destination, identity: StudyIdentity, *, earliest_date: str, before_date: str, calling_ae: str,
    timeout_s: float = 30.0,
) -> list[FoundStudy]:
    """The patient's CT studies dated ``earliest_date`` to the day before ``before_date``, most recent first."""
    if not identity.patient_id:
        return []
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = identity.patient_id
    query.IssuerOfPatientID = identity.issuer or None
    query.ModalitiesInStudy = "CT"
    query.StudyDate = f"{earliest_date}-{before_date}"
    query.StudyInstanceUID = ""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _association(ae, peer, timeout_s)
    found: dict[str, FoundStudy] = {}
    try:
        for status, answer in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PriorRetrievalError(f"C-FIND to {peer}: no answer in {timeout_s:g} s")
            if code in (0xFF00, 0xFF01) and answer is not None:
                uid, date = str(answer.get("StudyInstanceUID", "")), str(answer.get("StudyDate", "") or "")
                # The date range includes before_date itself (DICOM ranges are inclusive); the
                # current study is excluded by its UID, and same-day studies by the caller.
                if is_valid_uid(uid) and uid != identity.study_uid and date and date < before_date:
                    found[uid] = FoundStudy(uid, date)
            elif code != 0x0000:
                raise PriorRetrievalError(f"C-FIND to {peer} failed with status 0x{code:04X}")
    finally:
        assoc.release()
    return sorted(found.values(), key=lambda s: s.study_date, reverse=True)


def retrieve_study(
    peer: Destination, study_uid: str, out_dir: Path, *, calling_ae: str, timeout_s: float = 60.0,
    cancel: threading.Event | None = None,
) -> list[Path]:
    """C-GET every instance of ``study_uid`` into ``out_dir`` (one file per SOP Instance UID).

    Raises :class:`PriorRetrievalError` when the PACS cannot be reached, refuses, or reports
    failed or incomplete sub-operations: a partial prior is not a prior. ``cancel`` stops a
    retrieval its caller stopped waiting for (its next C-STORE is refused, the association aborted).
    """
    if not is_valid_uid(study_uid):
        raise PriorRetrievalError(f"not a valid Study Instance UID: {study_uid!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def on_store(event) -> int:
        if cancel is not None and cancel.is_set():
            return 0xA700  # out of resources: the caller gave up
        sop_uid = event.request.AffectedSOPInstanceUID
        if not is_valid_uid(sop_uid):
            return 0xC000
        path = out_dir / f"{sop_uid}.dcm"
        path.write_bytes(event.encoded_dataset())  # the bytes as received, behind a File Meta header
        written.append(path)
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in sorted(CT_SOP_CLASSES):
        ae.add_requested_context(sop_class)
        roles.append(build_role(sop_class, scp_role=True))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except OSError as exc:
        raise PriorRetrievalError(f"the PACS {peer} could not be reached: {exc}") from exc
    if not assoc.is_established:
        raise PriorRetrievalError(f"the PACS {peer} refused or did not answer the association")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = None
    try:
        for status, identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if cancel is not None and cancel.is_set():
                assoc.abort()
                raise PriorRetrievalError("retrieval stopped: the report does not wait longer")
            if not status:
                raise PriorRetrievalError(f"C-GET from {peer}: no answer in {timeout_s:g} s")
            final = status
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(final, "Status", None)
    failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
    if code != 0x0000 or failed:
        raise PriorRetrievalError(
            f"C-GET of the prior study from {peer} failed (status {'none' if code is None else f'0x{code:04X}'}, "
            f"{failed} failed sub-operation(s), {len(written)} instance(s) received)"
        )
    if not written:
        raise PriorRetrievalError(f"C-GET from {peer} returned no CT instance of the prior study")
    return written


__all__ = [
    "FoundStudy", "PriorRetrievalError", "StudyIdentity", "find_ct_studies", "patient_key", "retrieve_study",
    "study_identity",
]

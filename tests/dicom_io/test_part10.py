"""The File Format header of a received instance equals the one pynetdicom writes."""

import io

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from lungscreen.dicom_io.part10 import file_header

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "2.25.339919123829193892104471883939291273837"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLSLossless])
def test_header_is_pynetdicoms_byte_for_byte(sop_uid, syntax):
    meta = create_file_meta(sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=sop_uid, transfer_syntax=syntax)
    assert file_header(CT_IMAGE_STORAGE, sop_uid, syntax) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def test_header_reads_back_with_pydicom():
    header = file_header(CT_IMAGE_STORAGE, "1.2.3.45", ExplicitVRLittleEndian)
    ds = pydicom.dcmread(io.BytesIO(header), force=False)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.FileMetaInformationGroupLength == len(header) - 132 - 12

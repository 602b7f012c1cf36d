"""Configuration that fails fast: every setting is checked when the server starts, before it
accepts an association, and an unusable one stops it with one message naming the setting;
`lungscreen config check` says the same without starting, `config show` prints what is in force."""

from __future__ import annotations

import enum
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest

from lungscreen.errors import ConfigurationError
from lungscreen.models.card import BLOB_FILTER_CARD
from lungscreen.server.cli import main
from lungscreen.server.config import Range, Settings, SettingError, load_settings, settings_toml
from lungscreen.server.preflight import check_settings
from lungscreen.server.tls import destination_tls

CLI = [sys.executable, "-m", "lungscreen"]


def toml_file(tmp_path: Path, text: str, name: str = "lungscreen.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def setting_error(tmp_path: Path, text: str) -> SettingError:
    """The error the file's settings give, as loaded and then checked at start-up."""
    with pytest.raises(SettingError) as caught:
        check_settings(load_settings(toml_file(tmp_path, f'data_dir = "{tmp_path / "data"}"\n{text}')))
    return caught.value


# --- each value against its annotation ----------------------------------------------------------
def test_an_unknown_key_names_the_nearest_known_one(tmp_path):
    path = toml_file(tmp_path, "prot = 104\n")
    with pytest.raises(SettingError) as caught:
        load_settings(path)
    assert caught.value.setting == "prot"
    assert str(caught.value) == f"{path}: setting 'prot': unknown setting (did you mean 'port'?)"


@pytest.mark.parametrize(
    "line, setting, problem",
    [
        ('port = "104"', "port", "expected an integer, got '104' (a string)"),
        ("port = 70000", "port", "must be at most 65535, got 70000"),
        ("http_port = -1", "http_port", "must be at least 0, got -1"),
        ("idle_seconds = 0.1", "idle_seconds", "must be at least 0.2, got 0.1"),
        ("idle_seconds = true", "idle_seconds", "expected a finite number, got True (a boolean)"),
        ("workers = 0", "workers", "must be at least 1, got 0"),
        ("workers = 1.5", "workers", "expected an integer, got 1.5 (a number)"),
        ('ingest_sync = "fast"', "ingest_sync", "must be one of 'association', 'instance', got 'fast'"),
        ('ae_title = "ABCDEFGHIJKLMNOPQ"', "ae_title", "length must be at most 16, got 17"),
        ('allow_ae = "PACS"', "allow_ae", "expected a list, got 'PACS' (a string)"),
        ("allow_ae = [104]", "allow_ae", "item 1: expected a string, got 104 (an integer)"),
        ('ai_extension_code = ["A", "B"]', "ai_extension_code", "expected a list of 3 items, got 2"),
        ('presentation_state = "yes"', "presentation_state", "expected true or false, got 'yes' (a string)"),
        ("clinical_rules = 4", "clinical_rules", "expected a table, got 4 (an integer)"),
        ('api_token = "short"', "api_token", "length must be at least 16, got 5"),
        ("model = 3", "model", "expected a path (a string), got 3 (an integer)"),
    ],
)
def test_a_wrong_type_or_an_out_of_range_value_names_its_setting(tmp_path, line, setting, problem):
    path = toml_file(tmp_path, line + "\n")
    with pytest.raises(SettingError) as caught:
        load_settings(path)
    assert caught.value.setting == setting
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_flags_are_checked_as_the_file_is():
    with pytest.raises(SettingError, match=r"--receivers: setting 'receivers': value must be at least 0, got -1"):
        load_settings(receivers=-1)
    with pytest.raises(SettingError, match=r"--port: setting 'port': value must be at most 65535"):
        load_settings(port=70000)
    assert load_settings(receivers=3).receiver_processes == 3
    assert load_settings().receiver_processes == min(4, len(os.sched_getaffinity(0)))


class ArchiveSource(enum.Enum):
    NONE = "none"
    PACS = "pacs"


@dataclass(frozen=True)
class WithLaterFields(Settings):
    """Settings as other engineers extend them: the fields only, no checking code."""

    archive_server: Annotated[str, Range(1)] | None = None
    archive_timeout_s: Annotated[float, Range(0.1, 60)] = 5.0
    archive_source: ArchiveSource = ArchiveSource.NONE
    outline_colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def test_a_field_added_later_is_checked_from_its_annotation():
    """Engineers add settings (an archive, its source, colours...): the annotation and its
    bounds are all the checking they need to write."""

    assert WithLaterFields(archive_server="localhost:8001").archive_timeout_s == 5.0
    assert WithLaterFields(archive_source="pacs", outline_colours={"4B": [255, 0, 0]}).outline_colours == {"4B": (255, 0, 0)}
    shown = settings_toml(WithLaterFields(archive_source="pacs"))
    assert 'archive_source = "pacs"\n' in shown and "# archive_server is not set\n" in shown
    with pytest.raises(SettingError, match="setting 'archive_source': must be one of 'none', 'pacs', got 'ris'"):
        WithLaterFields(archive_source="ris")
    with pytest.raises(SettingError, match=r"setting 'outline_colours': key '4B': expected a list of 3 items"):
        WithLaterFields(outline_colours={"4B": [255, 0]})
    with pytest.raises(SettingError, match="setting 'archive_timeout_s': value must be at most 60"):
        WithLaterFields(archive_timeout_s=61)
    with pytest.raises(SettingError, match="setting 'archive_server': expected a string, got 8001"):
        WithLaterFields(archive_server=8001)


def test_certificate_and_key_go_together():
    with pytest.raises(SettingError, match="destination_cert and destination_key go together"):
        load_settings(destination_cert="/etc/lungscreen/node.pem")


def test_toml_values_become_the_types_the_server_uses(tmp_path):
    settings = load_settings(toml_file(tmp_path, 'allow_ae = ["PACS", "CT1"]\ntls_ca = "/etc/ca.pem"\nidle_seconds = 2\n'))
    assert settings.allow_ae == ("PACS", "CT1") and settings.tls_ca == Path("/etc/ca.pem")
    assert settings.idle_seconds == 2.0 and isinstance(settings.idle_seconds, float)


def test_an_unreadable_or_broken_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read the configuration file"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(toml_file(tmp_path, "port = \n"))


# --- what the settings name, checked at start-up ----------------------------------------------
def test_clinical_rules_keys_types_and_values_are_checked(tmp_path):
    error = setting_error(tmp_path, "clinical_rules = { max_finding = 3 }")
    assert error.setting == "clinical_rules.max_finding" and "did you mean 'max_findings'?" in str(error)
    error = setting_error(tmp_path, 'clinical_rules = { max_findings = "3" }')
    assert error.setting == "clinical_rules.max_findings" and "expected an integer, got '3'" in str(error)
    error = setting_error(tmp_path, "clinical_rules = { min_reported_diameter_mm = 8, actionable_diameter_mm = 6 }")
    assert error.setting == "clinical_rules" and "actionable_diameter_mm must be >= min_reported_diameter_mm" in str(error)
    # TOML has no null: false turns the lung-proximity rule off, and that is valid
    check_settings(load_settings(toml_file(tmp_path, "clinical_rules = { max_outside_lungs_mm = false }\n"), data_dir=tmp_path))


def test_series_selection_rules_are_checked(tmp_path):
    error = setting_error(tmp_path, "series_selection = { min_slice = 20 }")
    assert error.setting == "series_selection.min_slice" and "did you mean 'min_slices'?" in str(error)
    error = setting_error(tmp_path, "series_selection = { axial_tolerance_deg = 120.0 }")
    assert error.setting == "series_selection" and "axial_tolerance_deg" in str(error)


@pytest.fixture
def model_copy(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BLOB_FILTER_CARD.parent, folder)
    return folder


def test_a_model_card_that_breaks_its_schema_names_the_model(tmp_path, model_copy):
    card = json.loads((model_copy / "model_card.json").read_text())
    del card["operating_points"]
    (model_copy / "model_card.json").write_text(json.dumps(card))
    error = setting_error(tmp_path, f'model = "{model_copy}"')
    assert error.setting == "model" and "operating_points" in str(error)


def test_an_onnx_file_that_onnx_cannot_read_names_the_model(tmp_path, model_copy):
    card = json.loads((model_copy / "model_card.json").read_text())
    (model_copy / card["onnx_file"]).write_bytes(b"\x08\x07not a protobuf of an ONNX graph")
    error = setting_error(tmp_path, f'model = "{model_copy}"')
    assert error.setting == "model" and "is not a valid ONNX model" in str(error)


def test_an_operating_point_the_card_lacks_and_an_unknown_provider(tmp_path):
    error = setting_error(tmp_path, f'model = "{BLOB_FILTER_CARD}"\noperating_point = "screenign"')
    assert error.setting == "operating_point" and "no operating point 'screenign'" in str(error)
    error = setting_error(tmp_path, f'model = "{BLOB_FILTER_CARD}"\nproviders = ["CUDAExecutionProvidr"]')
    assert error.setting == "providers" and "CUDAExecutionProvidr" in str(error)


def test_a_destination_that_does_not_parse(tmp_path):
    error = setting_error(tmp_path, f'model = "{BLOB_FILTER_CARD}"\ndestination = ["PACS@10.0.0.5"]')
    assert error.setting == "destination" and "AE@host:port" in str(error)


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out",
                    cert, "-subj", f"/CN={name}"], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_files_must_be_readable_and_each_key_must_match_its_certificate(tmp_path):
    (cert_a, key_a), (_, key_b) = self_signed(tmp_path, "a"), self_signed(tmp_path, "b")
    base = f'model = "{BLOB_FILTER_CARD}"\n'
    check_settings(load_settings(toml_file(tmp_path, base + f'tls_cert = "{cert_a}"\ntls_key = "{key_a}"\n'),
                                 data_dir=tmp_path))
    error = setting_error(tmp_path, base + f'tls_cert = "{cert_a}"\ntls_key = "{key_b}"')
    assert error.setting == "tls_cert" and "key values mismatch" in str(error).lower()
    error = setting_error(tmp_path, base + f'destination_cert = "{cert_a}"\ndestination_key = "{tmp_path / "gone.key"}"')
    assert error.setting == "destination_cert" and "destination_ca, destination_cert, destination_key" in str(error)


def test_destinations_must_prove_who_they_are():
    context = destination_tls(load_settings())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# --- the command line ----------------------------------------------------------------------------
def test_config_show_prints_every_setting_with_its_default_and_reads_back(tmp_path, capsys):
    path = toml_file(tmp_path, 'port = 104\nallow_ae = ["PACS"]\nclinical_rules = { max_findings = 5 }\n')
    assert main(["config", "show", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "port = 104\n" in shown and "workers = 1\n" in shown and "# tls_cert is not set\n" in shown
    assert load_settings(toml_file(tmp_path, shown, "shown.toml")) == load_settings(path)
    assert settings_toml(Settings()).count("\n") == len(Settings.__dataclass_fields__)


def test_config_check_says_valid_or_names_the_setting_in_one_line(tmp_path):
    good = toml_file(tmp_path, f'data_dir = "{tmp_path / "data"}"\nmodel = "{BLOB_FILTER_CARD}"\n', "good.toml")
    result = subprocess.run([*CLI, "config", "check", str(good)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "configuration valid" in result.stdout and "a new store will be made" in result.stdout
    bad = toml_file(tmp_path, good.read_text() + "series_selection = { min_slices = 1 }\n", "bad.toml")
    result = subprocess.run([*CLI, "config", "check", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "setting 'series_selection'" in result.stderr


def test_serve_refuses_a_bad_configuration_before_it_listens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = toml_file(tmp_path, f'data_dir = "{tmp_path / "data"}"\nclinical_rules = {{ max_findngs = 3 }}\n')
    result = subprocess.run([*CLI, "serve", "--config", str(config), "--port", str(port), "--http-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lungscreen: error: setting 'clinical_rules.max_findngs': unknown key (did you mean 'max_findings'?); "
        "known: min_reported_diameter_mm, actionable_diameter_mm, max_findings, max_outside_lungs_mm"
    ]
    assert not (tmp_path / "data" / "lungscreen.sqlite").exists()  # nothing started
    result = subprocess.run([*CLI, "serve", "--config", str(config), "--port", "70000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port: setting 'port': value must be at most 65535" in result.stderr


def test_a_worker_that_cannot_start_says_so_for_each_study(tmp_path):
    """Rules that passed no start-up check (set here directly) make the worker's analyzer fail:
    the study fails saying the worker could not start and why, not that a process died."""
    from lungscreen.server.workers import AnalysisPool, ReportUIDs, WorkerStartFailed

    settings = Settings(model=BLOB_FILTER_CARD, data_dir=tmp_path, clinical_rules={"max_findings": 0})
    pool = AnalysisPool(settings)
    try:
        for _ in range(2):  # the worker stays up, and says the same for the next study
            with pytest.raises(WorkerStartFailed) as caught:
                pool.analyze([], uids=ReportUIDs.for_run("1.2.3", 1), run=1, predecessor=None)
            assert str(caught.value) == (
                "the analysis worker could not start: ValueError: max_findings must be >= 1"
            )
    finally:
        pool.shutdown()

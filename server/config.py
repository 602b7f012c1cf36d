"""Server settings: embedded defaults, a TOML config file, then command-line flags.

One frozen :class:`Settings` object is built at start-up and passed to every part; nothing
reads process-wide globals.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lungscreen.models.card import DEFAULT_MODEL_CARD


MAX_AUTO_RECEIVERS = 4  # each costs about 90 MiB; aggregate ingest was measured with 2 (on 2 cores)


@dataclass(frozen=True)
class Settings:
    ae_title: str = "LUNGSCREEN"
    host: str = "127.0.0.1"  # DICOM listener address; 0.0.0.0 to accept from the network
    port: int = 11112
    data_dir: Path = Path("data")
    allow_ae: tuple[str, ...] = ()  # calling AE titles allowed to connect; empty = any
    allow_host: tuple[str, ...] = ()  # peer IP addresses allowed to connect; empty = any
    tls_cert: Path | None = None  # PEM certificate + key: DICOM TLS on the listener (PS3.15 B.1)
    tls_key: Path | None = None
    tls_ca: Path | None = None  # PEM CA bundle: when set, callers must present a certificate it signed
    min_free_mb: int = 512  # below this much free disk in data_dir, new instances are refused
    # "association": instances fsynced in the background, the A-RELEASE response waits for them;
    # "instance": fsync before each C-STORE success (slower; see dicom_io/durability.py)
    ingest_sync: str = "association"
    receivers: int = 0  # DICOM receiver processes (associations spread over cores); 0: one per core, at most 4
    destination: tuple[str, ...] = ()  # AE@host:port, where reports are sent; tls:AE@host:port over DICOM TLS
    destination_ca: Path | None = None  # PEM CA bundle that TLS destinations' certificates chain to; default: the system's
    destination_cert: Path | None = None  # PEM certificate + key shown to TLS destinations that ask for one
    destination_key: Path | None = None
    idle_seconds: float = 5.0  # quiet period after a study's last instance
    http_host: str = "127.0.0.1"
    http_port: int = 8080  # 0 disables the HTTP endpoint
    api_token: str | None = None  # bearer token for HTTP calls that change state; default: data_dir/api-token
    model: Path = DEFAULT_MODEL_CARD
    operating_point: str | None = None  # None: the model card's default
    providers: tuple[str, ...] = ()  # ONNX Runtime providers; empty = best available
    inference_server: str | None = None  # grpc://HOST:PORT: the network runs on this Triton server
    # Triton down or slow: "wait" (the study stays queued, retried with backoff) or "local"
    # (this node's ONNX Runtime session runs it, and the SR and job record say so)
    inference_server_unavailable: str = "wait"
    inference_timeout_s: float = 120.0  # one request to the inference server (it is sent again on timeout)
    workers: int = 1  # studies analysed at once, each in its own worker process
    analysis_timeout_s: float = 600.0  # a run taking longer is stopped and the study fails
    send_timeout_s: float = 30.0
    max_delivery_attempts: int = 8
    retry_base_delay_s: float = 2.0
    institution: str | None = None
    presentation_state: bool = True  # also send a GSPS outlining the findings (viewers without SR support)
    ohif_url: str | None = None  # e.g. http://pacs.example/ohif: the review page links to the SR view there
    # Billing: the AI extension item (PerformedProcedureCodeSequence) and the main exam code
    # used when the CT carries none (Procedure Reported).
    ai_extension_code: tuple[str, str, str] = ("LUNG-AI-EXT", "99LUNGSCR", "AI-assisted diagnosis, extension of the main CT exam item")
    fallback_procedure_code: tuple[str, str, str] = ("LUNG-CT", "99LUNGSCR", "CT chest")
    clinical_rules: dict[str, Any] = field(default_factory=dict)  # see models.rules.ClinicalRules
    series_selection: dict[str, Any] = field(default_factory=dict)  # see dicom_io.select.SelectionRules

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if (self.destination_cert is None) != (self.destination_key is None):
            raise ValueError("destination_cert and destination_key go together")
        if self.idle_seconds < 0.2:
            raise ValueError("idle_seconds must be at least 0.2")
        if self.ingest_sync not in ("association", "instance"):
            raise ValueError(f"ingest_sync must be 'association' or 'instance': {self.ingest_sync!r}")
        if self.inference_server_unavailable not in ("wait", "local"):
            raise ValueError(f"inference_server_unavailable must be 'wait' or 'local': {self.inference_server_unavailable!r}")
        if self.inference_server is not None and not self.inference_server.startswith("grpc://"):
            raise ValueError(f"inference_server must be grpc://HOST:PORT: {self.inference_server!r}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.receivers < 0:
            raise ValueError("receivers must be 0 (one per CPU core) or more")
        if not 0 < len(self.ae_title) <= 16:
            raise ValueError(f"AE title must be 1 to 16 characters: {self.ae_title!r}")

    @property
    def receiver_processes(self) -> int:
        """How many receiver processes take DICOM associations (``receivers``, or one per core)."""
        return self.receivers or min(MAX_AUTO_RECEIVERS, len(os.sched_getaffinity(0)))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "lungscreen.sqlite"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


_TUPLES = {"allow_ae", "allow_host", "destination", "providers", "ai_extension_code", "fallback_procedure_code"}
_PATHS = {"data_dir", "model", "tls_cert", "tls_key", "tls_ca", "destination_ca", "destination_cert", "destination_key"}


def _coerce(name: str, value: Any) -> Any:
    if name in _TUPLES:
        return tuple(value)
    if name in _PATHS:
        return None if value is None else Path(value)
    return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``config_file`` (TOML, keys as the flags with ``_``), then non-None overrides."""
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as f:
            loaded = tomllib.load(f)
        unknown = set(loaded) - known
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    return replace(Settings(), **{k: _coerce(k, v) for k, v in values.items()})


def installation_value(data_dir: Path, name: str, make: Callable[[], str], *, mode: int = 0o644) -> str:
    """A value made once per installation and kept in ``data_dir/name`` with ``mode``
    (the Device UID, the HTTP token). The file is created exclusively: when two processes
    start at once, both read the one value that was written."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(make() + "\n")
    return path.read_text().strip()


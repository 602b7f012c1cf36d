"""Server settings: embedded defaults, a TOML config file, then command-line flags.

One frozen :class:`Settings` object is built at start-up and passed to every part; nothing
reads process-wide globals. Every field is checked against its type annotation when a
:class:`Settings` is made (so a new field is validated without more code), with the bounds
declared next to it (``Annotated[int, Range(1, 65535)]``); :mod:`server.preflight` then checks
what needs the files and libraries the settings name (rules, model, destinations, TLS).
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from lungscreen.dicom_io.outline import DEFAULT_OUTLINE_CATEGORIES, check_outline_categories
from lungscreen.errors import ConfigurationError
from lungscreen.models.card import DEFAULT_MODEL_CARD
from lungscreen.server.reviewers import check_reviewers


MAX_AUTO_RECEIVERS = 4  # each costs about 90 MiB; aggregate ingest was measured with 2 (on 2 cores)


class SettingError(ConfigurationError, ValueError):
    """One setting is unusable; ``setting`` names it (``clinical_rules.max_findings`` inside a table)."""

    def __init__(self, setting: str, problem: str, *, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}setting {setting!r}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a number setting, or of the length of a text or list setting."""

    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> None:
        measured, what = (len(value), "length") if isinstance(value, (str, tuple)) else (value, "value")
        if self.minimum is not None and measured < self.minimum:
            raise _Invalid(f"{what} must be at least {self.minimum:g}, got {measured!r}")
        if self.maximum is not None and measured > self.maximum:
            raise _Invalid(f"{what} must be at most {self.maximum:g}, got {measured!r}")


Port = Annotated[int, Range(1, 65535)]


@dataclass(frozen=True)
class Settings:
    ae_title: Annotated[str, Range(1, 16)] = "LUNGSCREEN"
    host: str = "127.0.0.1"  # DICOM listener address; 0.0.0.0 to accept from the network
    port: Port = 11112
    data_dir: Path = Path("data")
    allow_ae: tuple[str, ...] = ()  # calling AE titles allowed to connect; empty = any
    allow_host: tuple[str, ...] = ()  # peer IP addresses allowed to connect; empty = any
    tls_cert: Path | None = None  # PEM certificate + key: DICOM TLS on the listener (PS3.15 B.1)
    tls_key: Path | None = None
    tls_ca: Path | None = None  # PEM CA bundle: when set, callers must present a certificate it signed
    min_free_mb: Annotated[int, Range(0)] = 512  # below this much free disk in data_dir, new instances are refused
    # "association": instances fsynced in the background, the A-RELEASE response waits for them;
    # "instance": fsync before each C-STORE success (slower; see dicom_io/durability.py)
    ingest_sync: Literal["association", "instance"] = "association"
    # DICOM receiver processes (associations spread over cores); 0: one per core, at most 4
    receivers: Annotated[int, Range(0, 64)] = 0
    destination: tuple[str, ...] = ()  # AE@host:port, where reports are sent; tls:AE@host:port over DICOM TLS
    destination_ca: Path | None = None  # PEM CA bundle that TLS destinations' certificates chain to; default: the system's
    destination_cert: Path | None = None  # PEM certificate + key shown to TLS destinations that ask for one
    destination_key: Path | None = None
    idle_seconds: Annotated[float, Range(0.2, 86400)] = 5.0  # quiet period after a study's last instance
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Range(0, 65535)] = 8080  # 0 disables the HTTP endpoint
    api_token: Annotated[str, Range(16)] | None = None  # bearer token for HTTP calls that change state; default: data_dir/api-token
    model: Path = DEFAULT_MODEL_CARD
    operating_point: str | None = None  # None: the model card's default
    providers: tuple[str, ...] = ()  # ONNX Runtime providers; empty = best available
    inference_server: str | None = None  # grpc://HOST:PORT: the network runs on this Triton server
    # Triton down or slow: "wait" (the study stays queued, retried with backoff) or "local"
    # (this node's ONNX Runtime session runs it, and the SR and job record say so)
    inference_server_unavailable: Literal["wait", "local"] = "wait"
    # one request to the inference server (it is sent again on timeout)
    inference_timeout_s: Annotated[float, Range(1, 3600)] = 120.0
    workers: Annotated[int, Range(1, 64)] = 1  # studies analysed at once, each in its own worker process
    analysis_timeout_s: Annotated[float, Range(1)] = 600.0  # a run taking longer is stopped and the study fails
    # On stop (SIGTERM), a running analysis gets this long to finish; then it is handed back to
    # the queue for the next start. Keep it below the service's TimeoutStopSec.
    stop_grace_s: Annotated[float, Range(0, 3600)] = 60.0
    send_timeout_s: Annotated[float, Range(1, 3600)] = 30.0
    max_delivery_attempts: Annotated[int, Range(1, 1000)] = 8
    retry_base_delay_s: Annotated[float, Range(0, 3600)] = 2.0
    institution: str | None = None
    presentation_state: bool = True  # also send a GSPS outlining the findings (viewers without SR support)
    # Suggested Lung-RADS categories whose findings the SR and GSPS outline; the others are listed only (README)
    outline_categories: tuple[str, ...] = DEFAULT_OUTLINE_CATEGORIES
    ohif_url: str | None = None  # e.g. http://pacs.example/ohif: the review page links to the SR view there
    # Billing: the AI extension item (PerformedProcedureCodeSequence) and the main exam code
    # used when the CT carries none (the SR's requested procedure, the ledger's main item).
    ai_extension_code: tuple[str, str, str] = ("LUNG-AI-EXT", "99LUNGSCR", "AI-assisted diagnosis, extension of the main CT exam item")
    fallback_procedure_code: tuple[str, str, str] = ("LUNG-CT", "99LUNGSCR", "CT chest")
    clinical_rules: dict[str, Any] = field(default_factory=dict)  # see models.rules.ClinicalRules
    series_selection: dict[str, Any] = field(default_factory=dict)  # see dicom_io.select.SelectionRules
    reviewers: dict[str, str] = field(default_factory=dict)  # name -> secret hash (`lungscreen reviewer add NAME`)
    send_assessments: bool = True  # review-page verdicts go to the destinations as an assessment SR (server/assessments.py)
    target_false_marks_per_scan: float = 1.0  # the site's target, for the operating point proposed from verdicts
    # Follow-up screening (server/priors.py): the rule set (lungscreen.findings.RuleSet), where the prior comes from
    rule_set: Literal["lung-rads-2022", "c-lung-rads", "fleischner-2017"] = "lung-rads-2022"
    prior_lookback_days: Annotated[int, Range(1, 36500)] = 3 * 365  # the prior: the latest earlier CT within this many days
    prior_source: str | None = None  # AE@host:port of a PACS queried (C-FIND) and retrieved from (C-GET) when the history has none
    prior_timeout_s: Annotated[float, Range(1, 3600)] = 120.0  # the longest a report waits for its prior to be found and analysed
    # A prior retrieved from prior_source also reported in its own study (SR, GSPS, billing entry), as if the PACS had sent it
    report_retrieved_priors: bool = False

    def __post_init__(self) -> None:
        # Each field as its annotation says (a TOML list becomes a tuple, a string a Path), or a
        # SettingError naming it; then the rules that tie fields together.
        for name, hint in setting_types(type(self)).items():
            try:
                object.__setattr__(self, name, conform(hint, getattr(self, name)))
            except _Invalid as exc:
                raise SettingError(name, str(exc)) from None
        for first, second in (("tls_cert", "tls_key"), ("destination_cert", "destination_key")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise SettingError(first, f"{first} and {second} go together")
        try:
            check_reviewers(self.reviewers)
        except ValueError as exc:
            raise SettingError("reviewers", str(exc)) from None
        try:
            check_outline_categories(self.outline_categories)
        except ValueError as exc:
            raise SettingError("outline_categories", str(exc)) from None
        if self.inference_server is not None and not self.inference_server.startswith("grpc://"):
            raise SettingError("inference_server", f"must be grpc://HOST:PORT, got {self.inference_server!r}")

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


# --- checking a value against its annotation ---------------------------------------------------
class _Invalid(ValueError):
    """A value that does not fit its annotation; the caller names the setting."""


@cache
def setting_types(cls: type | None = None) -> dict[str, Any]:
    """Each field of ``cls`` (default :class:`Settings`) and its annotation, with its bounds."""
    return get_type_hints(cls or Settings, include_extras=True)


def conform(hint: Any, value: Any) -> Any:
    """``value`` as annotation ``hint`` wants it (TOML arrays become tuples, strings Paths),
    or :class:`_Invalid` saying what was expected. Used for Settings and for the tables of rules."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *marks = get_args(hint)
        value = conform(base, value)
        for mark in marks:
            if isinstance(mark, Range) and value is not None:
                mark.check(value)
        return value
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if type(None) in options and (value is None or value is False and bool not in options):
            return None  # TOML has no null: false turns an optional setting off
        problems = []
        for option in options:
            if option is not type(None):
                try:
                    return conform(option, value)
                except _Invalid as exc:
                    problems.append(str(exc))
        raise _Invalid(" or ".join(problems) if len(problems) > 1 else problems[0])
    if origin is Literal:
        if value in get_args(hint) and not isinstance(value, bool):
            return value
        raise _Invalid(f"must be one of {', '.join(map(repr, get_args(hint)))}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected true or false, got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(f"expected an integer, got {_shown(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Invalid(f"expected a finite number, got {_shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Invalid(f"expected a string, got {_shown(value)}")
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(value)
        raise _Invalid(f"expected a path (a string), got {_shown(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected a list, got {_shown(value)}")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise _Invalid(f"expected a list of {len(args)} items, got {len(value)}: {_shown(value)}")
        items = []
        for index, (item_hint, item) in enumerate(zip(args, value)):
            try:
                items.append(conform(item_hint, item))
            except _Invalid as exc:
                raise _Invalid(f"item {index + 1}: {exc}") from None
        return tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a table, got {_shown(value)}")
        key_hint, value_hint = get_args(hint) or (str, Any)
        table = {}
        for key, item in value.items():
            try:
                table[conform(key_hint, key)] = conform(value_hint, item)
            except _Invalid as exc:
                raise _Invalid(f"key {key!r}: {exc}") from None
        return table
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return value if isinstance(value, hint) else hint(value)
        except ValueError:
            raise _Invalid(f"must be one of {', '.join(repr(m.value) for m in hint)}, got {value!r}") from None
    raise TypeError(f"no check for settings annotated {hint!r}: add one to server.config.conform")


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_table(setting: str, rules_class: type, table: Mapping[str, Any]) -> dict[str, Any]:
    """The keys and value types of a table of rules (``clinical_rules``, ``series_selection``)
    checked against the fields of the dataclass that reads it; the names in errors are dotted."""
    hints = get_type_hints(rules_class, include_extras=True)
    known = [f.name for f in fields(rules_class)]
    checked = {}
    for key, value in table.items():
        if key not in hints:
            raise SettingError(f"{setting}.{key}", f"unknown key{_suggestion(key, known)}; known: {', '.join(known)}")
        try:
            checked[key] = conform(hints[key], value)
        except _Invalid as exc:
            raise SettingError(f"{setting}.{key}", str(exc)) from None
    return checked


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- loading and showing ----------------------------------------------------------------------
def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``config_file`` (TOML, keys as the flags with ``_``), then non-None overrides.

    Raises :class:`SettingError` (a :class:`ConfigurationError`) naming the first unusable
    setting and where it came from.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_toml(Path(config_file)))
    flags = {k: v for k, v in overrides.items() if v is not None and v != ()}
    for name, value in flags.items():
        values[name] = _checked(name, value, source=f"--{name.replace('_', '-')}")
    return Settings(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            loaded = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the configuration file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    return {name: _checked(name, value, source=str(path)) for name, value in loaded.items()}


def _checked(name: str, value: Any, *, source: str) -> Any:
    hints = setting_types()
    if name not in hints:
        raise SettingError(name, f"unknown setting{_suggestion(name, list(hints))}", source=source)
    try:
        return conform(hints[name], value)
    except _Invalid as exc:
        raise SettingError(name, str(exc), source=source) from None


def settings_toml(settings: Settings) -> str:
    """The effective configuration as a TOML file that :func:`load_settings` reads back; a
    setting without a value is a comment."""
    lines = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        lines.append(f"# {f.name} is not set" if value is None else f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }" if value else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


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


"""``lungscreen install-service``: LungScreen as a systemd service.

Writes the unit (``server/service/lungscreen.service``, shipped in the wheel) with ExecStart
pointing at the Python that runs this command, and a default configuration unless one exists;
on a real install (prefix ``/``) it also creates the system user ``lungscreen``. The unit runs
the server as that user with ``/etc/lungscreen/lungscreen.toml`` and ``/var/lib/lungscreen``
(StateDirectory), restarts it on failure, stops it with SIGTERM so that running analyses
finish or are handed back (``stop_grace_s``), and sends its log to the journal.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "lungscreen"
TEMPLATES = Path(__file__).with_name("service")
UNIT_PATH = Path("etc/systemd/system/lungscreen.service")
CONFIG_PATH = Path("etc/lungscreen/lungscreen.toml")


@dataclass(frozen=True)
class ServiceInstall:
    unit: Path
    config: Path
    unit_text: str
    config_text: str
    config_kept: bool  # an existing configuration is never overwritten
    create_user: bool


def unit_text(exec_start: str) -> str:
    return (TEMPLATES / "lungscreen.service").read_text().replace("@EXEC_START@", exec_start)


def plan_install(prefix: Path, exec_start: str | None = None) -> ServiceInstall:
    """What an install under ``prefix`` writes and does."""
    exec_start = exec_start or f"{shlex.quote(sys.executable)} -m lungscreen"
    config = prefix / CONFIG_PATH
    return ServiceInstall(
        unit=prefix / UNIT_PATH,
        config=config,
        unit_text=unit_text(exec_start),
        config_text=(TEMPLATES / "lungscreen.toml").read_text(),
        config_kept=config.exists(),
        create_user=prefix.resolve() == Path("/") and not _user_exists(SERVICE_USER),
    )


def install_service(prefix: Path = Path("/"), *, dry_run: bool = False) -> ServiceInstall:
    plan = plan_install(prefix)
    say = print
    if dry_run:
        say(f"# would write {plan.unit}:\n{plan.unit_text}")
        if plan.config_kept:
            say(f"# would keep the existing {plan.config}")
        else:
            say(f"# would write {plan.config}:\n{plan.config_text}")
        if plan.create_user:
            say(f"# would create the system user {SERVICE_USER}: {' '.join(_useradd())}")
        return plan
    if plan.create_user:
        subprocess.run(_useradd(), check=True)
        say(f"created the system user {SERVICE_USER}")
    plan.unit.parent.mkdir(parents=True, exist_ok=True)
    plan.unit.write_text(plan.unit_text)
    plan.unit.chmod(0o644)
    say(f"wrote {plan.unit}")
    if plan.config_kept:
        say(f"kept the existing {plan.config}")
    else:
        plan.config.parent.mkdir(parents=True, exist_ok=True)
        plan.config.write_text(plan.config_text)
        plan.config.chmod(0o640)  # it may come to hold the API token: readable by root and the service
        if _user_exists(SERVICE_USER) and os.geteuid() == 0:
            os.chown(plan.config, 0, grp.getgrnam(SERVICE_USER).gr_gid)
        say(f"wrote {plan.config}")
    if prefix.resolve() == Path("/"):
        say("next: systemctl daemon-reload && systemctl enable --now lungscreen; logs: journalctl -u lungscreen")
    return plan


def _useradd() -> list[str]:
    return ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/lungscreen", "--no-create-home",
            "--shell", "/usr/sbin/nologin", SERVICE_USER]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

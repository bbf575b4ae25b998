"""The service and container packaging: systemd units, Dockerfile, deployment examples.

The units are checked by ``systemd-analyze verify`` (Debian package ``systemd``; no running
systemd needed). It exits 0 for most mistakes, an unknown key or a bad value included, and
only prints a line about them, so any output at all counts as a problem here. It also checks
that the commands exist: ExecStart is pointed at this interpreter's fetchd, and ExecReload's
``kill`` must be installed (Debian package ``procps``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
INSTALLED_FETCHD = "/usr/local/bin/fetchd"  # where the units expect the console script


def installed_fetchd() -> str:
    found = shutil.which("fetchd", path=str(Path(sys.executable).parent))
    assert found, f"no fetchd console script next to {sys.executable}: pip install -e ."
    return found


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze not found: install Debian's systemd package"
    return found


def verify(unit_dir: Path, name: str) -> str:
    """Everything ``systemd-analyze verify`` says about unit ``name`` in ``unit_dir``."""
    result = subprocess.run(
        [systemd_analyze(), "verify", str(unit_dir / name)],
        capture_output=True,
        text=True,
        cwd=unit_dir,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0"},
        timeout=60,
    )
    said = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        said += f"\n(exit status {result.returncode})"
    return said.strip()


def installable(unit: str, tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    """A copy of ``unit`` whose commands exist on this machine, optionally with one edit."""
    text = (UNITS / unit).read_text()
    assert text.count(f"ExecStart={INSTALLED_FETCHD} ") == 1
    text = text.replace(INSTALLED_FETCHD, installed_fetchd())
    if edit:
        old, new = edit
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / unit).write_text(text)
    return tmp_path


# The unit file, and the unit systemd-analyze loads from it (a template needs an instance).
UNIT_NAMES = [("fetchd.service", "fetchd.service"), ("fetchd@.service", "fetchd@example.service")]


@pytest.mark.parametrize(("unit", "name"), UNIT_NAMES)
def test_unit_verifies_without_a_word(unit: str, name: str, tmp_path: Path) -> None:
    assert shutil.which("kill", path="/usr/sbin:/usr/bin:/sbin:/bin"), (
        "ExecReload needs kill: install Debian's procps package"
    )
    assert verify(installable(unit, tmp_path), name) == ""


BROKEN = [
    # (edit, what systemd-analyze must say)
    (("ProtectSystem=strict", "ProtectSystem=strict\nProtectSystm=strict"), "Unknown key"),
    (("Type=notify", "Type=notfy"), "Failed to parse service type"),
    (("TimeoutStopSec=45s", "TimeoutStopSec=45x"), "Failed to parse"),
    (("RestrictAddressFamilies=AF_INET ", "RestrictAddressFamilies=AF_INTE "), "address family"),
    (("SystemCallFilter=@system-service", "SystemCallFilter=@system-servce"), "system call"),
    (("ExecReload=kill ", "ExecReload=no-such-kill "), "is not executable"),
]


@pytest.mark.parametrize(("unit", "name"), UNIT_NAMES)
@pytest.mark.parametrize(("edit", "complaint"), BROKEN, ids=[b[1] for b in BROKEN])
def test_a_broken_unit_is_reported(
    unit: str, name: str, edit: tuple[str, str], complaint: str, tmp_path: Path
) -> None:
    """The check above would fail for a real mistake: systemd-analyze reports each of these."""
    said = verify(installable(unit, tmp_path, edit), name)
    assert said != ""
    assert complaint in said, said


def settings(unit: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each setting of a unit file, in order."""
    section, out = "", []
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_the_template_differs_from_the_plain_unit_only_per_instance() -> None:
    plain, template = settings("fetchd.service"), settings("fetchd@.service")
    expected = [
        (section, key, value.replace("/etc/fetchd/fetchd.yaml", "/etc/fetchd/%i.yaml"))
        for section, key, value in plain
    ]
    per_instance = {
        "Description": "fetchd mail retrieval daemon, instance %i",
        "StateDirectory": "fetchd/%i",
        "SyslogIdentifier": "fetchd-%i",
    }
    expected = [(s, k, per_instance.get(k, v)) for s, k, v in expected]
    assert template == expected


def test_the_unit_matches_the_daemon() -> None:
    service = {k: v for section, k, v in settings("fetchd.service") if section == "[Service]"}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"{INSTALLED_FETCHD} run -c /etc/fetchd/fetchd.yaml"
    assert service["ExecReload"] == "kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    # fetchd waits up to 30 s for the message in hand; systemd must wait longer than that.
    assert int(service["TimeoutStopSec"].removesuffix("s")) > 30
    assert service["StateDirectory"] == "fetchd"
    assert service["User"] != "root"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), " ".join(args.split())))
    return out


GLOB = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last match wins; a
    pattern that matches a directory matches everything in it)."""
    ignored = False
    parts = path.split("/")
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(
            GLOB.get(token) or re.escape(token)
            for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern)
        )
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_dockerignore_matching_works() -> None:
    assert dockerignored(".git/config")
    assert dockerignored(".venv/bin/python")
    assert dockerignored("demo-run/fetchd.yaml")
    assert dockerignored("fetchd/__pycache__/cli.cpython-311.pyc")
    assert not dockerignored("fetchd/cli.py")


def test_dockerfile() -> None:
    steps = dockerfile()
    args = {instruction: value for instruction, value in steps}  # the last of each
    copied = []
    for instruction, value in steps:
        if instruction == "FROM":
            assert value.split()[0] == "python:3.11-slim-bookworm"
        if instruction == "COPY" and not value.startswith("--from"):
            copied += value.split()[:-1]
    for source in copied:
        assert (REPO / source).exists(), source
        assert not dockerignored(source.rstrip("/")), f"{source} is in .dockerignore"
    # pip install . needs the readme that pyproject.toml names, and the package itself.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["readme"] in copied
    assert "fetchd/" in copied
    assert not any(dockerignored(str(p.relative_to(REPO))) for p in REPO.glob("fetchd/*.py"))

    assert args["USER"].split(":")[0] not in ("root", "0")
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert args["HEALTHCHECK"].endswith('CMD ["fetchd", "health"]')
    assert json.loads(args["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "fetchd"]
    assert "fetchd" in project["scripts"]
    assert json.loads(args["CMD"]) == ["run"]
    env = " ".join(value for instruction, value in steps if instruction == "ENV")
    assert "FETCHD_CONFIG=/etc/fetchd/fetchd.yaml" in env.split()
    assert "STATE_DIRECTORY=/var/lib/fetchd" in env.split()
    assert json.loads(args["VOLUME"]) == ["/var/lib/fetchd"]


def test_deployment_examples() -> None:
    compose = yaml.safe_load((REPO / "config" / "compose.example.yaml").read_text())
    fetchd = compose["services"]["fetchd"]
    assert any(v.endswith(":/etc/fetchd:ro") for v in fetchd["volumes"])
    assert any(v.endswith(":/var/lib/fetchd") for v in fetchd["volumes"])
    kubernetes = list(yaml.safe_load_all((REPO / "config" / "kubernetes.example.yaml").read_text()))
    containers = [
        c
        for doc in kubernetes
        if doc and doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    sidecar = next(c for c in containers if c["name"] == "fetchd")
    assert sidecar["livenessProbe"]["exec"]["command"] == ["fetchd", "health"]
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert {"/etc/fetchd", "/var/lib/fetchd"} <= mounts

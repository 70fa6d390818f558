"""requirements.lock, from which the image installs: exact pins that cover pyproject.toml's
dependencies (with their extras) and everything those need. CI (`.ci/run`) also installs it into
its fresh virtual environment before the project; this test is the cheap, offline part."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#;]+)\s*(#.*)?$")


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows() -> None:
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run .ci/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {requirement}: run .ci/lock"
        )


def test_the_lock_is_closed_under_the_pinned_versions_requirements() -> None:
    """What each locked package needs (at the installed version, when it is the pinned one) is
    locked too, extras requested by pyproject included."""
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, set[str]] = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        extras.setdefault(canonicalize_name(requirement.name), set()).update(requirement.extras)
    environment = default_environment()
    checked = 0
    for name, version in pins.items():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue  # another version installed here: its metadata says nothing about the pinned one
        checked += 1
        for text in dist.requires or []:
            requirement = Requirement(text)
            wanted = [{**environment, "extra": extra} for extra in ["", *extras.get(name, ())]]
            if requirement.marker is not None and not any(requirement.marker.evaluate(env) for env in wanted):
                continue
            assert canonicalize_name(requirement.name) in pins, f"{name} needs {requirement}, not locked"
    assert checked >= len(pins) // 2, "most pinned versions should be the ones the suite runs with"

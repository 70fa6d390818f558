"""The container files, checked without a Docker engine: the Dockerfile's command runs as written
against the installed `dispatcher` with the image's configuration and environment, its health
check passes against the running service (and fails once it stopped), the build context holds a
complete package, and the compose file wires the service to MongoDB and Redis."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest

from dispatcher.settings import load_settings

ROOT = Path(__file__).parent.parent
DISPATCHER = Path(sys.executable).with_name("dispatcher")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S+)', args):
            env[key] = value[1:-1] if value.startswith('"') else value
    return env


def copied_config() -> tuple[Path, str]:
    """The repo file the image installs as its configuration, and where."""
    for args in instruction("COPY"):
        source, target = args.split()[-2:]
        if target.startswith("/etc/dispatcher/"):
            return ROOT / source, target
    raise AssertionError("the Dockerfile copies no configuration to /etc/dispatcher/")


def container_argv(config: Path) -> list[str]:
    """ENTRYPOINT + CMD as docker runs them, the configuration path pointing at `config`."""
    _, target = copied_config()
    [entrypoint], [cmd] = instruction("ENTRYPOINT"), instruction("CMD")
    argv = exec_form(entrypoint) + exec_form(cmd)
    assert target in argv, f"CMD does not read the configuration the image installs ({target})"
    assert argv[0] == "dispatcher"
    return [str(DISPATCHER), *(str(config) if arg == target else arg for arg in argv[1:])]


def container_like(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The image's configuration file and environment, in a scratch working directory."""
    source, _ = copied_config()
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    shutil.copy(source, config)
    env = {"PATH": f"{DISPATCHER.parent}:/usr/bin:/bin", **image_env()}
    if os.environ.get("PYTHONPATH"):  # a checkout other than the installed one is under test
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return config, env


def test_dockerfile_runs_a_slim_python_as_an_unprivileged_user() -> None:
    [base] = instruction("FROM")
    assert base == "python:3.11-slim"
    keywords = [keyword for keyword, _ in dockerfile()]
    users = instruction("USER")
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    # The exact versions of the lock first, then the project without resolving anything again.
    runs = instruction("RUN")
    lock = next(i for i, run in enumerate(runs) if "-r requirements.lock" in run)
    project = next(i for i, run in enumerate(runs) if re.search(r"\bpip install --no-deps \.(\s|$)", run))
    assert lock < project and "--no-deps" in runs[lock] and "pip check" in runs[project]
    assert "/var/lib/dispatcher/var" in instruction("VOLUME")[0]  # the ledger outlives the container
    assert exec_form(instruction("ENTRYPOINT")[0]) == ["dispatcher"]
    assert exec_form(instruction("CMD")[0]) == ["serve", "--workers", "auto", "--config", "/etc/dispatcher/config.toml"]
    [health] = instruction("HEALTHCHECK")
    probe = exec_form(health.partition("CMD")[2].strip())
    assert probe[0] == "python" and "urllib" in probe[-1] and "/-/healthz" in probe[-1]
    assert "curl" not in health and "wget" not in health


def test_container_command_validates_the_image_configuration(tmp_path: Path) -> None:
    config, env = container_like(tmp_path)
    argv = container_argv(config)
    # The same options, same order, but the serve-only --workers.
    serve_only = {argv.index("--workers"), argv.index("--workers") + 1} if "--workers" in argv else set()
    check = [arg if arg != "serve" else "check-config" for i, arg in enumerate(argv) if i not in serve_only]
    run = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(check)}\n{run.stderr}"
    printed = json.loads(run.stdout)
    assert printed["server"]["host"] == "0.0.0.0"  # reachable from outside the container
    assert printed["logging"]["format"] == "json"


def test_container_command_serves_and_its_health_check_tells(tmp_path: Path, mongo_url: str, database: Any) -> None:
    from dispatcher.embedded_store import free_port

    config, env = container_like(tmp_path)
    port = free_port()
    env.update(
        DISPATCHER__SERVER__PORT=str(port),
        DISPATCHER__SERVER__HOST="127.0.0.1",
        MONGODB_URL=mongo_url,
        DISPATCHER__STORE__DATABASE=database.name,
    )
    [health] = instruction("HEALTHCHECK")
    probe = exec_form(health.partition("CMD")[2].strip())
    probe[0] = sys.executable

    def healthy() -> bool:
        return subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 0

    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        service = subprocess.Popen(container_argv(config), cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not healthy():
            assert service.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        service.send_signal(signal.SIGTERM)  # docker stop
        code = service.wait(30)
    assert code == 0, log.read_text()
    assert not healthy()
    # The image logs JSON: every line of the service's log is one object.
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), lines


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def build_context(tmp_path: Path) -> Path:
    """What the Dockerfile's COPY instructions put in /src, minus what .dockerignore drops."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    src = tmp_path / "src"
    src.mkdir()
    for args in instruction("COPY"):
        *sources, target = args.split()
        if target.startswith("/etc/"):
            continue
        for source in sources:
            origin = ROOT / source
            assert origin.exists(), f"COPY {source}: no such file in the repo"
            assert not _ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
            files = [origin] if origin.is_file() else [p for p in origin.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if not _ignored(relative, patterns):
                    destination = src / relative
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(file, destination)
    return src


def _module_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (not under TYPE_CHECKING, not in functions)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in (
            ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ()
        ):
            if isinstance(child, ast.Import):
                names.update(alias.name.split(".")[0] for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.add(child.module.split(".")[0])
    return names


SOURCE_ONLY = ("dispatcher.fakes", "dispatcher.loadtest")


def test_build_context_installs_every_package_and_dependency(tmp_path: Path) -> None:
    """What `pip install .` in /src would install, read by setuptools from the build context (no
    wheel is built: that needs the network for build isolation)."""
    read_configuration = pytest.importorskip("setuptools.config.pyprojecttoml").read_configuration

    src = build_context(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "[tool.setuptools] support is beta" on older setuptools
        project = read_configuration(src / "pyproject.toml", expand=True, ignore_option_errors=False)
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        assert (src / readme).is_file(), f"pyproject's readme {readme} is not copied into the image"
    packages = set(project["tool"]["setuptools"]["packages"])
    # Every package of the repo is installed (a subpackage missing from pyproject's list is not),
    # but the harness and its fake providers, which ship with the source tree only.
    for init in [*src.glob("dispatcher/**/__init__.py"), *src.glob("actors/**/__init__.py")]:
        package = ".".join(init.parent.relative_to(src).parts)
        if package.startswith(SOURCE_ONLY):
            assert package not in packages, f"{package} is in the wheel; it ships with the source tree only"
            continue
        assert package in packages, f"package {package} is missing from [tool.setuptools].packages"
    # Every library the service imports is a (non-optional) requirement: the image has nothing else.
    required = {
        re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in project["project"].get("dependencies", [])
    }
    distributions = packages_distributions()
    missing: dict[str, list[str]] = {}
    for module in [*src.glob("dispatcher/**/*.py"), *src.glob("actors/**/*.py")]:
        if ".".join(module.relative_to(src).parts).startswith(SOURCE_ONLY):
            continue  # not in the wheel; `dispatcher loadtest` has its own extra
        for name in _module_imports(module) - set(sys.stdlib_module_names) - {"dispatcher", "actors"}:
            dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
            if not dists & required:
                missing.setdefault(name, []).append(module.relative_to(src).as_posix())
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def _interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (an error when VAR is unset)."""

    def one(match: re.Match[str]) -> str:
        if environ.get(match[1]):
            return environ[match[1]]
        if match[2] == ":?":
            raise AssertionError(f"compose refuses to start without {match[1]}: {match[3]}")
        return match[3] or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


# What .env holds in the compose tests (compose.env.example, filled in).
DOTENV = {
    "MONGO_USERNAME": "dispatcher",
    "MONGO_PASSWORD": "m0ng0pw",
    "REDIS_PASSWORD": "r3d1spw",
    "DISPATCHER_API_KEYS": "key-one,key-two",
}


def test_compose_wires_the_service_to_mongodb_and_redis() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"dispatcher", "mongo", "redis"} <= set(services)
    service = services["dispatcher"]
    assert service["build"] in (".", {"context": "."})
    environment = {key: _interpolate(str(value), DOTENV) for key, value in service["environment"].items()}
    assert environment["MONGODB_URL"].startswith("mongodb://dispatcher:m0ng0pw@mongo:")
    assert environment["REDIS_URL"].startswith("redis://:r3d1spw@redis:")
    assert set(service["depends_on"]) >= {"mongo", "redis"}
    # Published on loopback unless told otherwise.
    [port] = service["ports"]
    assert _interpolate(port, {}) == "127.0.0.1:3000:3000"
    assert _interpolate(port, {"DISPATCHER_PUBLISH": "0.0.0.0:3000"}) == "0.0.0.0:3000:3000"
    for name in ("mongo", "redis"):
        assert services[name]["image"].split(":")[0] == name and services[name]["healthcheck"]["test"]
        assert "ports" not in services[name]  # reachable from the service's network only
    mongo = {key: _interpolate(str(value), DOTENV) for key, value in services["mongo"]["environment"].items()}
    assert (mongo["MONGO_INITDB_ROOT_USERNAME"], mongo["MONGO_INITDB_ROOT_PASSWORD"]) == ("dispatcher", "m0ng0pw")
    redis = [_interpolate(arg, DOTENV) for arg in services["redis"]["command"]]
    assert redis[redis.index("--appendonly") + 1] == "yes" and redis[redis.index("--requirepass") + 1] == "r3d1spw"
    # Every volume a service mounts is declared (the data outlives the containers).
    for name in ("dispatcher", "mongo", "redis"):
        for volume in services[name]["volumes"]:
            assert volume.split(":")[0] in compose["volumes"]
    assert any(volume.endswith(":/var/lib/dispatcher/var") for volume in service["volumes"])
    # Every secret is required: without .env, nothing starts with an empty password.
    for key in ("MONGODB_URL", "REDIS_URL", "DISPATCHER_API_KEYS"):
        assert ":?" in str(service["environment"][key])
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "compose.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(DOTENV) <= set(example)

    # The service's configuration in that container: the image's file and environment, compose's
    # environment on top; secrets end up where they belong.
    source, _ = copied_config()
    settings = load_settings(source, environ={**image_env(), **environment})
    assert settings.store.url.get_secret_value() == environment["MONGODB_URL"]
    assert settings.cluster.redis_url.get_secret_value() == environment["REDIS_URL"]
    assert settings.server.host == "0.0.0.0"
    assert settings.auth.keys.get_secret_value() == "key-one,key-two"  # API keys on
    # docker stop must wait for the drain.
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace[1]) > settings.dispatcher.drain_timeout_seconds

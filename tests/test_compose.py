"""Static checks of the container setup: docker-compose.yml, docker/Dockerfile, .dockerignore, the
requirement lists and the healthcheck script. No Docker engine is needed (none exists where this was
written), so nothing here builds an image: these tests read the files and run what can run outside one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from oal_shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER_DIR = REPO / "docker"
HEALTHCHECK_SCRIPT = DOCKER_DIR / "healthcheck.py"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
OVERRIDE_FILES = {
    "sd-folder": DOCKER_DIR / "compose.sd-folder.yml",
    "hf-cache": DOCKER_DIR / "compose.hf-cache.yml",
}

# The product's CLIs as the task describes them; used only while a CLI module is not written yet, so the
# compose file can be checked before the other services land. Subcommand -> options compose may use.
DOCUMENTED_CLIS: dict[str, dict[str, set[str]]] = {
    "oal-synth": {
        "serve": set(),
        "worker": {"--burst", "--queue"},
        "pretrain": set(),
        "submit": set(),
        "status": set(),
    },
    "oal-train": {
        "fit": {"--recipe", "--out", "--preset", "--set", "--config"},
        "eval": set(),
        "report": {"--out"},
    },
}
CLI_MODULES = {"oal-synth": "oal_synth.cli", "oal-train": "oal_trainer.cli"}
HEAVY_DISTRIBUTIONS = {"torch", "torchvision", "diffusers", "transformers"}
SHARED_PATH_SETTINGS = ("shard_root", "artifact_dir", "generator_root")
# What `oal-synth serve` imports in the API image (docs/ARCHITECTURE.md: the API process never imports torch).
API_PATH_MODULES = ("oal_synth.cli", "oal_synth.api.app", "oal_synth.queue", "oal_synth.store")

# ---------------------------------------------------------------- reading the files


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$ as if the shell set nothing."""

    def substitute(match: re.Match) -> str:
        name, operator, default = match.group(1), match.group(2) or "", match.group(3) or ""
        if operator.endswith("?"):
            pytest.fail(f"${{{name}}} is required in docker-compose.yml; `docker compose` fails without it")
        return default if operator.endswith("-") else ""

    value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", substitute, value)
    return value.replace("$$", "$")


def as_argv(value: str | list | None) -> list[str]:
    if value is None:
        return []
    return [interpolate(str(part)) for part in (shlex.split(value) if isinstance(value, str) else value)]


def service_environment(service: dict) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {key: None if value is None else interpolate(str(value)) for key, value in raw.items()}


def parse_mounts(service: dict) -> list[dict]:
    """Each mount as {source, target, read_only, named}; short ("src:dst:ro") and long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = interpolate(entry).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target = entry.get("source"), interpolate(entry["target"])
            read_only = bool(entry.get("read_only"))
        named = bool(source) and not source.startswith(("/", ".", "~"))
        mounts.append({"source": source, "target": target, "read_only": read_only, "named": named})
    return mounts


def mount_holding(path: str, mounts: list[dict]) -> dict | None:
    """The innermost mount whose target contains `path` (nested mounts shadow outer ones)."""
    holding = [m for m in mounts if PurePosixPath(path).is_relative_to(PurePosixPath(m["target"]))]
    return max(holding, key=lambda m: len(PurePosixPath(m["target"]).parts), default=None)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Stage name -> {base, instructions, entrypoint, cmd, user, ...}; ENTRYPOINT/CMD/USER/ENV inherit."""
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current: dict | None = None
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ARG" and current is None:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = arguments.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            parent = stages.get(image)
            current = {
                "name": name,
                "base": image,
                "parent": parent["name"] if parent else None,
                "instructions": [],
                "entrypoint": parent["entrypoint"] if parent else [],
                "cmd": parent["cmd"] if parent else [],
                "user": parent["user"] if parent else "root",
                "env": dict(parent["env"]) if parent else {},
            }
            stages[name] = current
        elif current is not None:
            current["instructions"].append((keyword, arguments))
            if keyword == "ENTRYPOINT":
                current["entrypoint"], current["cmd"] = json.loads(arguments), []
            elif keyword == "CMD":
                current["cmd"] = json.loads(arguments)
            elif keyword == "USER":
                current["user"] = arguments
            elif keyword == "ENV":
                current["env"].update(re.findall(r"(\w+)=(\S*)", arguments))
    return stages


def stage_lineage(stages: dict[str, dict], name: str) -> list[dict]:
    lineage = [stages[name]]
    while lineage[-1]["parent"]:
        lineage.append(stages[lineage[-1]["parent"]])
    return lineage


def read_requirements(path: Path) -> dict[str, Requirement]:
    """Name -> requirement of a pip requirements file, following `-r other.txt` as pip does."""
    requirements: dict[str, Requirement] = {}
    for line in (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()):
        if line.startswith("-r "):
            requirements.update(read_requirements(path.parent / line[3:].strip()))
        elif line:
            requirement = Requirement(line)
            requirements[canonicalize_name(requirement.name)] = requirement
    return requirements


def pinned_version(requirement: Requirement) -> str | None:
    pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    return pins[0] if len(pins) == 1 else None


def dockerignore_excludes(relative_path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a match on a parent folder counts."""

    def to_regex(pattern: str) -> re.Pattern:
        parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(part, re.escape(part)) for part in parts) + r"(?:/.*)?")

    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if to_regex(pattern.lstrip("!")).fullmatch(relative_path):
            excluded = not negated
    return excluded


def cli_commands(program: str) -> dict[str, set[str]]:
    """Subcommand -> option names of the real typer/click app, or the documented ones before it exists."""
    import click
    import typer

    module_name = CLI_MODULES[program]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return DOCUMENTED_CLIS[program]
    # typer vendors its own click, so its groups are not click.Group: look for `.commands` instead.
    candidates = [typer.main.get_command(obj) for obj in vars(module).values() if isinstance(obj, typer.Typer)]
    candidates += [obj for obj in vars(module).values() if isinstance(obj, click.Group)]
    groups = [group for group in candidates if isinstance(getattr(group, "commands", None), dict)]
    assert groups, f"{module_name} holds no typer app or click group with subcommands of {program}"
    return {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for name, command in groups[0].commands.items()
    }


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return dockerfile_stages(DOCKER_DIR / "Dockerfile")


def oal_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if any(k.startswith("OAL_") for k in service_environment(s))}


def effective_argv(service: dict, stages: dict[str, dict]) -> list[str]:
    """What the container runs: compose entrypoint/command, else the image's (its Dockerfile target's)."""
    target = stages.get((service.get("build") or {}).get("target", ""), {})
    if "entrypoint" in service:  # overriding the entrypoint also drops the image's CMD
        return [*as_argv(service["entrypoint"]), *as_argv(service.get("command"))]
    command = as_argv(service["command"]) if "command" in service else target.get("cmd", [])
    return [*target.get("entrypoint", []), *command]


# ---------------------------------------------------------------- compose: schema and structure


def test_compose_files_pass_the_compose_spec_schema(tmp_path: Path):
    files = [COMPOSE_FILE, *OVERRIDE_FILES.values()]
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The validator must be able to fail: a misspelt key in a copy is refused.
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["worker"]["healtcheck"] = broken["services"]["worker"].pop("healthcheck")
    broken_file = tmp_path / "docker-compose.yml"
    broken_file.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(broken_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "healtcheck" in result.stdout + result.stderr


def test_product_services_are_all_there(services: dict[str, dict]):
    assert {"redis", "api", "worker", "worker-cpu", "trainer", "dashboard"} <= set(services)


def test_every_named_volume_is_declared(compose: dict, services: dict[str, dict]):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in parse_mounts(service):
            if mount["named"]:
                assert mount["source"] in declared, f"service {name} mounts undeclared volume {mount['source']!r}"


def test_oal_env_vars_are_settings_fields_with_valid_values(services, monkeypatch: pytest.MonkeyPatch):
    fields = set(Settings.model_fields)
    for name, service in oal_services(services).items():
        env = service_environment(service)
        oal_vars = {key: value for key, value in env.items() if key.startswith("OAL_")}
        unknown = [key for key in oal_vars if key[len("OAL_") :].lower() not in fields]
        assert not unknown, f"service {name}: {unknown} are not fields of oal_shared.settings.Settings"

        for key in [k for k in os.environ if k.startswith("OAL_")]:
            monkeypatch.delenv(key)
        for key, value in oal_vars.items():
            if value is not None:  # no value: passed through from the host shell only when set there
                monkeypatch.setenv(key, value)
        Settings()  # raises, naming the variable, on a value the service itself would refuse at start


def test_path_settings_lie_on_mounts_shared_by_all_services(services: dict[str, dict]):
    path_fields = {field for field, info in Settings.model_fields.items() if "Path" in str(info.annotation)}
    backing: dict[str, set[tuple[str, str]]] = {}
    for name, service in oal_services(services).items():
        mounts = parse_mounts(service)
        for key, value in service_environment(service).items():
            field = key[len("OAL_") :].lower()
            if not key.startswith("OAL_") or field not in path_fields or value is None:
                continue
            mount = mount_holding(value, mounts)
            assert mount is not None, f"service {name}: {key}={value} is on no mounted volume"
            backing.setdefault(field, set()).add((mount["source"], value))
    # Worker writes, API reads manifests and uploads, trainer reads: one volume and one path for all.
    for field in SHARED_PATH_SETTINGS:
        assert len(backing.get(field, ())) == 1, f"OAL_{field.upper()} differs between services: {backing.get(field)}"


def test_writers_mount_their_paths_read_write(services: dict[str, dict]):
    # The worker writes shards and builds generators; the API stores uploaded embedding sets.
    for name, field in (("worker", "shard_root"), ("worker", "generator_root"), ("api", "artifact_dir")):
        service = services[name]
        path = service_environment(service)[f"OAL_{field.upper()}"]
        assert not mount_holding(path, parse_mounts(service))["read_only"], f"{name} cannot write {path}"


def test_api_port_published_is_the_port_it_binds(services: dict[str, dict]):
    api = services["api"]
    env = service_environment(api)
    assert env["OAL_API_HOST"] == "0.0.0.0"  # reachable from outside its container
    container_ports = {interpolate(str(port)).rsplit(":", 1)[-1] for port in api["ports"]}
    assert container_ports == {env["OAL_API_PORT"]}


def test_workers_can_scale_and_reserve_gpus(services: dict[str, dict]):
    worker = services["worker"]
    # `--scale worker=N` fails on a fixed container name or host port.
    assert "container_name" not in worker and "ports" not in worker
    for name in ("worker", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert service_environment(services[name])["OAL_DEVICE"].startswith("cuda")
    for name in ("worker-cpu", "trainer-cpu"):
        assert "deploy" not in services[name], f"{name} must run without a GPU"
        assert service_environment(services[name])["OAL_DEVICE"] == "cpu"


def test_profiles_keep_cpu_worker_and_trainers_off_by_default(services: dict[str, dict]):
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "train" in services["trainer"]["profiles"]
    assert "profiles" not in services["worker"] and "profiles" not in services["api"]


def test_healthchecks_on_redis_api_and_workers(services: dict[str, dict], stages: dict[str, dict]):
    from_script = load_healthcheck_module()
    assert as_argv(services["redis"]["healthcheck"]["test"]) == ["CMD", "redis-cli", "ping"]
    for name, mode in (("api", "api"), ("worker", "worker"), ("worker-cpu", "worker"), ("dashboard", "dashboard")):
        argv = as_argv(services[name]["healthcheck"]["test"])
        assert argv[:2] == ["CMD", "oal-healthcheck"] and argv[2:] == [mode], f"{name}: {argv}"
        assert mode in from_script.CHECKS
        # The script is installed in the image that service runs.
        lineage = stage_lineage(stages, services[name]["build"]["target"])
        copies = [args for stage in lineage for kw, args in stage["instructions"] if kw == "COPY"]
        assert any(args.endswith("docker/healthcheck.py /usr/local/bin/oal-healthcheck") for args in copies), name


def check_cli_argv(where: str, argv: list[str]) -> bool:
    """Whether argv runs one of our CLIs; if it does, its subcommand and options must exist."""
    if not argv or Path(argv[0]).name not in CLI_MODULES:
        return False
    program = Path(argv[0]).name
    commands = cli_commands(program)
    if argv[1:] == ["--help"]:
        return True
    assert len(argv) > 1 and argv[1] in commands, f"{where}: {argv} names no subcommand of {program}"
    allowed = commands[argv[1]] | {"--help"}
    options = {arg.split("=", 1)[0] for arg in argv[2:] if arg.startswith("-")}
    assert options <= allowed, f"{where}: {program} {argv[1]} has no option(s) {options - allowed}"
    return True


def test_commands_name_real_subcommands_and_options(services: dict[str, dict], stages: dict[str, dict]):
    in_compose = [check_cli_argv(f"service {name}", effective_argv(s, stages)) for name, s in services.items()]
    assert sum(in_compose) >= 5  # api, worker, worker-cpu, trainer, trainer-cpu
    # The images' own defaults too (`docker run IMAGE` without a command).
    in_images = [check_cli_argv(f"stage {name}", [*st["entrypoint"], *st["cmd"]]) for name, st in stages.items()]
    assert sum(in_images) >= 5  # api, worker-cpu, worker-gpu, trainer-cpu, trainer-gpu


def test_trainer_writes_its_run_below_a_writable_mount(services: dict[str, dict], stages: dict[str, dict]):
    for name in ("trainer", "trainer-cpu"):
        argv = effective_argv(services[name], stages)
        out_dir = argv[argv.index("--out") + 1]
        mount = mount_holding(out_dir, parse_mounts(services[name]))
        assert mount is not None and mount["named"] and not mount["read_only"], f"{name}: --out {out_dir}"


def test_sd_folder_override_lands_below_each_generator_root(services: dict[str, dict]):
    override = yaml.safe_load(OVERRIDE_FILES["sd-folder"].read_text())["services"]
    for name, extra in override.items():
        generator_root = service_environment(services[name])["OAL_GENERATOR_ROOT"]
        for mount in parse_mounts(extra):
            assert PurePosixPath(mount["target"]).parent == PurePosixPath(generator_root), f"{name}: {mount}"
            assert mount["read_only"]
    # Every service that loads generators gets the folder, the API too (it lists them).
    assert {"api", "worker", "worker-cpu", "trainer", "trainer-cpu"} <= set(override)


def test_hf_cache_override_replaces_the_mount_at_hf_home(services: dict[str, dict]):
    override = yaml.safe_load(OVERRIDE_FILES["hf-cache"].read_text())["services"]
    for name, extra in override.items():
        hf_home = service_environment(services[name])["HF_HOME"]
        (mount,) = parse_mounts(extra)
        # Compose merges a service's volumes by target, so the bind replaces the named volume.
        assert mount["target"] == hf_home in {m["target"] for m in parse_mounts(services[name])}, name
    models_users = {name for name, s in services.items() if "HF_HOME" in service_environment(s)}
    assert models_users == set(override)


# ---------------------------------------------------------------- Dockerfile, context, requirements


def test_build_sections_name_existing_dockerfiles_and_targets(services: dict[str, dict]):
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            image = interpolate(service["image"])
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
            continue
        context = REPO / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"
        assert build["target"] in dockerfile_stages(dockerfile), f"service {name}: no stage {build['target']!r}"
        declared_args = {args.partition("=")[0] for kw, args in dockerfile_instructions(dockerfile) if kw == "ARG"}
        assert set(build.get("args") or {}) <= declared_args, f"service {name}: build args the Dockerfile lacks"


def test_base_image_args_default_to_the_dockerfiles_bases(services: dict[str, dict]):
    # docker-compose 1.x turns an arg without a value into "", which would empty a FROM; so the compose
    # file repeats the defaults, and they must stay the Dockerfile's.
    dockerfile_defaults = {
        name: default
        for keyword, arguments in dockerfile_instructions(DOCKER_DIR / "Dockerfile")
        for name, _, default in [arguments.partition("=")]
        if keyword == "ARG" and name.endswith("_IMAGE")
    }
    assert {"PYTHON_IMAGE", "DEBIAN_IMAGE", "CUDA_IMAGE"} <= set(dockerfile_defaults)
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert len(built) >= 6
    for name, build in built.items():
        args = build.get("args") or {}
        assert set(dockerfile_defaults) <= set(args), f"service {name}: pass every base-image arg"
        for arg, default in dockerfile_defaults.items():
            assert interpolate(str(args[arg])) == default, f"service {name}: {arg} defaults to {args[arg]!r}"


def test_copy_sources_exist_and_stay_in_the_build_context():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    for heavy in (".venv", ".git", "artifacts", "data", "runs", "services/x/__pycache__/m.pyc"):
        assert dockerignore_excludes(heavy, patterns), f".dockerignore lets {heavy} into the build context"
    copied = 0
    for keyword, arguments in dockerfile_instructions(DOCKER_DIR / "Dockerfile"):
        words = arguments.split()
        if keyword != "COPY" or any(word.startswith("--from") for word in words):
            continue
        sources = [word for word in words if not word.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
            assert not dockerignore_excludes(source, patterns), f"COPY {source}: excluded by .dockerignore"
            copied += 1
    assert copied >= 5


def test_dockerfile_follows_the_usual_lint_rules(stages: dict[str, dict]):
    for stage in stages.values():
        base = stage["base"]
        if base not in stages:
            assert ":" in base and not base.endswith(":latest"), f"stage {stage['name']}: unpinned base {base!r}"
        pip_cache_off = stage["env"].get("PIP_NO_CACHE_DIR") == "1"
        for keyword, arguments in stage["instructions"]:
            if keyword == "RUN" and "apt-get install" in arguments:
                assert "--no-install-recommends" in arguments and "rm -rf /var/lib/apt/lists/*" in arguments
            if keyword == "RUN" and "pip install" in arguments:
                assert pip_cache_off or "--no-cache-dir" in arguments, f"stage {stage['name']}: pip cache kept"
            if keyword in ("CMD", "ENTRYPOINT"):
                assert isinstance(json.loads(arguments), list), f"stage {stage['name']}: {keyword} not exec form"


def test_layers_that_change_often_come_after_the_dependencies(stages: dict[str, dict]):
    # A code or healthcheck change must not reinstall torch (GBs) or the pinned requirements: no stage
    # that installs them copies code before (or inherits a stage that copied code at all).
    def volatile(steps: list[tuple[str, str]]) -> list[int]:
        return [
            i
            for i, (kw, args) in enumerate(steps)
            if kw == "COPY" and ("--from=wheel" in args or "healthcheck.py" in args or " shared " in f" {args} ")
        ]

    installing = 0
    for stage in stages.values():
        steps = stage["instructions"]
        installs = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "pip install -r" in args]
        if not installs:
            continue
        installing += 1
        assert volatile(steps) and min(volatile(steps)) > max(installs), f"stage {stage['name']}: code before deps"
        for parent in stage_lineage(stages, stage["name"])[1:]:
            assert not volatile(parent["instructions"]), f"stage {stage['name']}: base {parent['name']} copies code"
        torch = [i for i in installs if "requirements-torch.txt" in steps[i][1]]
        others = [i for i in installs if i not in torch]
        if torch:
            assert max(torch) < min(others), f"stage {stage['name']}: torch must install in the first layer"
    assert installing >= 4  # api, dashboard, worker-cpu, worker-gpu


def test_images_the_services_run_are_not_root(services: dict[str, dict], stages: dict[str, dict]):
    targets = {service["build"]["target"] for service in services.values() if "build" in service}
    for target in targets:
        assert stages[target]["user"] not in ("root", "0"), f"target {target} runs as root"
    # One uid everywhere, so the shared named volumes have one owner.
    uids = set(re.findall(r"useradd --uid (\d+)", (DOCKER_DIR / "Dockerfile").read_text()))
    assert len(uids) == 1


def test_requirement_pins_match_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {canonicalize_name(Requirement(d).name): Requirement(d) for d in pyproject["project"]["dependencies"]}
    worker = read_requirements(DOCKER_DIR / "requirements-worker.txt")
    api = read_requirements(DOCKER_DIR / "requirements-api.txt")

    assert set(declared) <= set(worker), f"worker image lacks {set(declared) - set(worker)}"
    for name, requirement in {**worker, **api}.items():
        version = pinned_version(requirement)
        assert version is not None, f"{name} is not pinned with == in docker/requirements-*.txt"
        if name in declared:
            assert declared[name].specifier.contains(version), f"{name}=={version} breaks pyproject's {declared[name]}"
    for name in api:
        assert name in worker and pinned_version(api[name]) == pinned_version(worker[name]), name
    assert not HEAVY_DISTRIBUTIONS & set(api), "the API image must not install torch/diffusers"
    for name in ("torch", "torchvision"):
        assert pinned_version(worker[name]) == pinned_version(declared[name])
    # The images install torch in a layer of its own, from this file.
    assert set(read_requirements(DOCKER_DIR / "requirements-torch.txt")) == {"torch", "torchvision"}

    gpu_extra = {
        canonicalize_name(Requirement(d).name): Requirement(d)
        for d in pyproject["project"]["optional-dependencies"]["gpu"]
    }
    gpu = read_requirements(DOCKER_DIR / "requirements-gpu.txt")
    assert set(gpu) == set(gpu_extra), "requirements-gpu.txt must hold exactly pyproject's gpu extra"
    for name, requirement in gpu.items():
        version = pinned_version(requirement)
        assert version is not None and gpu_extra[name].specifier.contains(version), f"{name} in requirements-gpu.txt"


def distribution_closure(requirements: dict[str, Requirement]) -> set[str]:
    """Installed distributions that `pip install -r` of these requirements would bring (extras ignored)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_api_image_packages_suffice_for_serve_and_healthcheck():
    """Import what `oal-synth serve` and the api healthcheck import, with every installed package that the
    API image lacks made unimportable (torch, diffusers, ...): a missing entry in requirements-api.txt or
    a heavy import in the API path fails here rather than in a container."""
    in_image = distribution_closure(read_requirements(DOCKER_DIR / "requirements-api.txt")) | {"oal-ood"}
    blocked = sorted(
        top
        for top, dists in metadata.packages_distributions().items()
        if not {canonicalize_name(d) for d in dists} & in_image and top.isidentifier()
    )
    assert "torch" in blocked and "fastapi" not in blocked
    # While a module of the API path is not written yet, the ones that are get checked.
    modules = ["oal_shared.settings"] + [name for name in API_PATH_MODULES if _module_exists(name)]
    script = f"""
import importlib, importlib.abc, sys
BLOCKED = set({blocked!r})
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not installed in the API image", name=name)
sys.meta_path.insert(0, NotInImage())
for module in {modules!r}:
    importlib.import_module(module)
app_module = sys.modules.get("oal_synth.api.app")
if app_module is not None and hasattr(app_module, "create_app"):
    app_module.create_app()  # what `uvicorn ... factory=True` calls in `oal-synth serve`
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------- the healthcheck script, for real


def load_healthcheck_module():
    spec = importlib.util.spec_from_file_location("oal_healthcheck", HEALTHCHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Healthz(BaseHTTPRequestHandler):
    ok_path = "/healthz"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == self.ok_path else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


class _DashboardRoot(_Healthz):
    ok_path = "/"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]):
    """A real HTTP server on a free local port, for the duration of the block; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_api_healthcheck_follows_the_api_port(oal_env, monkeypatch: pytest.MonkeyPatch, capsys):
    healthcheck = load_healthcheck_module()
    with serving(_Healthz) as port:
        monkeypatch.setenv("OAL_API_PORT", str(port))
        assert healthcheck.main(["api"]) == 0
    monkeypatch.setenv("OAL_API_PORT", str(_free_port()))
    assert healthcheck.main(["api"]) == 1
    assert "did not answer" in capsys.readouterr().out
    assert healthcheck.main(["nonsense"]) == 2


def test_dashboard_healthcheck_fetches_the_dashboard_page(monkeypatch: pytest.MonkeyPatch, capsys):
    healthcheck = load_healthcheck_module()
    with serving(_DashboardRoot) as port:
        monkeypatch.setenv("RQ_DASHBOARD_PORT", str(port))
        assert healthcheck.main(["dashboard"]) == 0
    monkeypatch.setenv("RQ_DASHBOARD_PORT", str(_free_port()))
    assert healthcheck.main(["dashboard"]) == 1
    assert "did not answer" in capsys.readouterr().out


def test_healthcheck_arguments_hold_no_spaces(services: dict[str, dict]):
    # podman's Docker-compatible API (what docker-compose talks to) splits exec-form healthcheck
    # arguments at spaces: `python -c "import x; ..."` ran as `python -c import`. Found by the
    # compose check; one word per argument survives it.
    for name, service in services.items():
        argv = as_argv((service.get("healthcheck") or {}).get("test"))
        assert not any(" " in arg for arg in argv), f"{name}: healthcheck {argv}"


def test_worker_healthcheck_sees_a_registered_live_worker(oal_env, redis_conn, capsys):
    from rq import Queue, Worker

    healthcheck = load_healthcheck_module()
    assert healthcheck.main(["worker"]) == 1  # nothing registered yet
    assert "no RQ worker" in capsys.readouterr().out

    worker = Worker([Queue(oal_env.queue_name, connection=redis_conn)], connection=redis_conn)
    worker.register_birth()
    assert healthcheck.main(["worker"]) == 0
    assert worker.name in capsys.readouterr().out

    # Registered but its process is gone (a worker killed before its key expired).
    redis_conn.hset(worker.key, "pid", str(_dead_pid()))
    assert healthcheck.main(["worker"]) == 1
    assert "no such process" in capsys.readouterr().out

    worker.register_death()
    assert healthcheck.main(["worker"]) == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid

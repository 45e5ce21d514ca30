"""The ``Dockerfile``, kept honest without a container engine.

No image can be built here, so the file is checked in the ways that do not need one:

- every path it copies from the build context exists and is not excluded by
  ``.dockerignore``;
- its shape: two stages on the same base, a numeric non-root user, ``llm-sidecar run`` as
  the entrypoint, a ``HEALTHCHECK``, the tiktoken cache baked where ``TIKTOKEN_CACHE_DIR``
  points, and the default paths the Helm chart mounts;
- its build-stage ``RUN`` steps, run as they are written (absolute paths moved under a
  temporary directory) on a copy of the build context in a fresh virtual environment;
  then, with the runtime stage's environment and the network blocked for tiktoken, token
  counting works offline, the entrypoint starts the sidecar and the ``HEALTHCHECK``
  command reports it healthy, and SIGTERM stops it cleanly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CHART = REPO / "helm" / "llm-sidecar"
# Absolute paths the Dockerfile's steps use, moved under the test's temporary root.
MOVED = ("/opt/venv", "/opt/tiktoken", "/src", "/etc/llm-sidecar", "/var/lib/llm-sidecar")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends in a continuation line"
    return result


def args_of(text: str) -> list[str]:
    """Exec form (JSON array) or shell words."""
    if text.startswith("["):
        parsed: list[str] = json.loads(text)
        return parsed
    return shlex.split(text)


def stage_names() -> list[str]:
    names = []
    for ins in instructions():
        if ins.keyword == "FROM":
            words = ins.args.split()
            names.append(words[2] if len(words) >= 3 and words[1].upper() == "AS" else "")
    return names


def build_arg_defaults() -> dict[str, str]:
    defaults = {}
    for ins in instructions():
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name] = value
    return defaults


def env_of(stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions():
        if ins.keyword == "ENV" and ins.stage == stage:
            for word in shlex.split(ins.args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def copies(stage: int | None = None) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) of each COPY/ADD."""
    result = []
    for ins in instructions():
        if ins.keyword in ("COPY", "ADD") and (stage is None or ins.stage == stage):
            words = args_of(ins.args)
            flags = {w.split("=")[0]: w.partition("=")[2] for w in words if w.startswith("--")}
            paths = [w for w in words if not w.startswith("--")]
            result.append((paths[:-1], paths[-1], flags.get("--from")))
    return result


# -- .dockerignore ------------------------------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(text):
        if text.startswith("**", i):
            out += ".*"
            i += 2
            if text.startswith("/", i):
                out = out[:-2] + "(.*/)?"
                i += 1
        elif text[i] == "*":
            out += "[^/]*"
            i += 1
        elif text[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(text[i])
            i += 1
    return re.compile(out)


def ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        rules.append((_pattern(line), negate))
    return rules


def excluded(relative: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern, negate in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            result = not negate
    return result


def context_files() -> list[str]:
    """The files of the build context (the repository minus .dockerignore), git-tracked or not."""
    rules = ignore_rules()
    files = []
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if path.is_file() and not relative.startswith((".git/", ".venv/")) and not excluded(relative, rules):
            files.append(relative)
    return files


# -- static checks ------------------------------------------------------------------------------


def test_every_copied_path_exists_in_the_build_context() -> None:
    in_context = context_files()
    local = [c for c in copies() if c[2] is None]
    assert local, "the Dockerfile copies the project"
    for sources, _, _ in local:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            prefix = source.rstrip("/")
            matched = [f for f in in_context if f == prefix or f.startswith(prefix + "/")]
            assert matched, f"COPY {source}: excluded by .dockerignore"
    # The package as installed needs its data files: they are in the context too.
    for data in (REPO / "sidecar" / "data").glob("*.yaml"):
        assert data.relative_to(REPO).as_posix() in in_context
    assert not [f for f in in_context if "__pycache__" in f]


def test_the_context_holds_what_the_install_reads() -> None:
    """pyproject.toml's readme is in the context (pip fails without it)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    copied = {s.rstrip("/") for sources, _, frm in copies() if frm is None for s in sources}
    assert project["readme"] in copied
    assert "pyproject.toml" in copied


def test_shape() -> None:
    ins = instructions()
    froms = [i.args.split()[0] for i in ins if i.keyword == "FROM"]
    assert len(froms) == 2, "multi-stage: build, runtime"
    assert froms[0] == froms[1], "the venv is copied between stages: same base image and paths"
    base = build_arg_defaults()[froms[0].strip("${}")]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    runtime = len(froms) - 1
    by_kw = {i.keyword: i for i in ins if i.stage == runtime}
    user = by_kw["USER"].args.split(":")[0]
    assert user.isdigit() and int(user) > 0, "a numeric non-root user (runAsNonRoot can check it)"
    assert args_of(by_kw["ENTRYPOINT"].args) == ["llm-sidecar", "run"]
    healthcheck = by_kw["HEALTHCHECK"].args
    assert "CMD" in healthcheck and "/healthz" in healthcheck
    # The runtime stage gets only the venv and the baked encodings from the build stage.
    build_name = stage_names()[0]
    assert sorted((s[0], d) for s, d, frm in copies(runtime) if frm == build_name) == [
        ("/opt/tiktoken", "/opt/tiktoken"),
        ("/opt/venv", "/opt/venv"),
    ]
    assert [c for c in copies(runtime) if c[2] is None] == []
    env = env_of(runtime)
    assert env["TIKTOKEN_CACHE_DIR"] == "/opt/tiktoken"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "read-only root: no bytecode written at run time"
    build_runs = " ".join(i.args for i in ins if i.keyword == "RUN" and i.stage == 0)
    assert 'prepare_offline_cache(Path("/opt/tiktoken"))' in build_runs


def test_default_paths_are_the_charts() -> None:
    cmd = args_of(next(i.args for i in instructions() if i.keyword == "CMD"))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    helpers = (CHART / "templates" / "_sidecar.tpl").read_text()
    config_file = re.search(r'define "llm-sidecar.configFile" -}}([^{]+){{', helpers)
    assert config_file is not None
    assert cmd[cmd.index("--config") + 1] == config_file.group(1)
    assert cmd[cmd.index("--data-dir") + 1] == values["dataDir"]
    assert str(values["securityContext"]["runAsUser"]) == next(
        i.args.split(":")[0] for i in instructions() if i.keyword == "USER"
    )


# -- the build steps, for real ------------------------------------------------------------------


def moved(text: str, root: Path) -> str:
    for path in MOVED:
        text = re.sub(rf"(?<![\w/.]){re.escape(path)}(?=[/\s'\"]|$)", str(root) + path, text)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage's steps, run on a copy of the build context; returns the fake root."""
    root = tmp_path_factory.mktemp("image")
    bin_dir = root / "usr-local-bin"
    bin_dir.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (bin_dir / "python").symlink_to(base_python)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", str(root)),
        "LANG": "C.UTF-8",
        **{k: moved(v, root) for k, v in env_of(0).items()},
    }
    for name in (
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_CONFIG_FILE",
        "SSL_CERT_FILE",
    ):
        if name in os.environ:
            env[name] = os.environ[name]
    workdir = root
    rules = ignore_rules()
    for ins in instructions():
        if ins.stage != 0:
            continue
        if ins.keyword == "WORKDIR":
            workdir = Path(moved(ins.args, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            words = [w for w in args_of(ins.args) if not w.startswith("--")]
            dest = workdir / words[-1]
            for source in words[:-1]:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(
                        src,
                        dest,
                        ignore=lambda d, names: [
                            n for n in names if excluded((Path(d) / n).relative_to(REPO).as_posix(), rules)
                        ],
                        dirs_exist_ok=True,
                    )
                else:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest / src.name)
        elif ins.keyword == "RUN":
            command = moved(ins.args, root)
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert proc.returncode == 0, f"RUN {ins.args}\n{proc.stdout}\n{proc.stderr}"
    assert (root / "opt" / "venv" / "bin" / "llm-sidecar").is_file()
    assert any((root / "opt" / "tiktoken").iterdir())
    return root


def runtime_env(root: Path) -> dict[str, str]:
    env = {k: moved(v, root) for k, v in env_of(1).items()}
    env["PATH"] = env["PATH"].replace("$PATH", "/usr/bin:/bin")
    env["HOME"] = str(root / "tmp")
    (root / "tmp").mkdir(exist_ok=True)
    # No network: tiktoken's downloads (requests) go through a proxy that refuses.
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""})
    env["LANG"] = "C.UTF-8"
    return env


def test_tokens_count_offline_in_the_image(built: Path) -> None:
    script = (
        "import tiktoken\n"
        "for name in ('cl100k_base', 'o200k_base'):\n"
        "    assert len(tiktoken.get_encoding(name).encode('hello world')) == 2, name\n"
        "from sidecar.tokens import prepare_offline_cache\n"
        "import os\n"
        "assert str(prepare_offline_cache()) == os.environ['TIKTOKEN_CACHE_DIR']\n"
    )
    env = runtime_env(built)
    proc = subprocess.run(
        [str(built / "opt" / "venv" / "bin" / "python"), "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=built,
    )
    assert proc.returncode == 0, proc.stderr


def test_entrypoint_runs_and_healthcheck_passes(built: Path) -> None:
    env = runtime_env(built)
    (built / "etc" / "llm-sidecar").mkdir(parents=True, exist_ok=True)
    data_dir = built / "var" / "lib" / "llm-sidecar"
    data_dir.mkdir(parents=True, exist_ok=True)
    (built / "etc" / "llm-sidecar" / "sidecar.yaml").write_text(
        "version: sidecar/v1\nupstreams:\n  - {name: openai, url: 'http://127.0.0.1:9', provider: openai}\n"
    )
    ins = instructions()
    entrypoint = args_of(next(i.args for i in ins if i.keyword == "ENTRYPOINT"))
    cmd = [moved(a, built) for a in args_of(next(i.args for i in ins if i.keyword == "CMD"))]
    admin = free_port()
    command = [
        shutil.which(entrypoint[0], path=env["PATH"]) or entrypoint[0],
        *entrypoint[1:],
        *cmd,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        f"127.0.0.1:{admin}",
    ]
    healthcheck = next(i.args for i in ins if i.keyword == "HEALTHCHECK")
    check_cmd = [a.replace(":9464/", f":{admin}/") for a in args_of(healthcheck.partition("CMD")[2].strip())]
    with subprocess.Popen(
        command, env=env, cwd=data_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            deadline = time.monotonic() + 30
            healthy = False
            while time.monotonic() < deadline and proc.poll() is None:
                check = subprocess.run(check_cmd, env=env, capture_output=True, timeout=10, check=False)
                if check.returncode == 0:
                    healthy = True
                    break
                time.sleep(0.2)
            assert healthy, "the HEALTHCHECK command never passed"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            assert proc.stderr is not None
            stderr = proc.stderr.read()
    assert "metrics on http://127.0.0.1" in stderr

"""The Dockerfiles, checked statically (no Docker engine here): pins, users, entrypoints, context.

These are the properties a reviewer would otherwise check by eye: every base image and the key
ML packages pinned, non-root users matching the chart's UID, no credentials in the images, and a
build context (.dockerignore) that lets in exactly what the Dockerfiles COPY.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from tests.charts.helm import ROOT

OPERATOR = ROOT / "images" / "operator" / "Dockerfile"
RUNTIME = ROOT / "images" / "runtime" / "Dockerfile"
RUNTIME_LOCK = ROOT / "images" / "runtime" / "constraints.txt"
DOCKERFILES = {"operator": OPERATOR, "runtime": RUNTIME}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return out


def _args(path: Path) -> dict[str, str]:
    return dict(
        arg.split("=", 1) for keyword, arg in instructions(path) if keyword == "ARG" and "=" in arg
    )


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_are_pinned(name: str) -> None:
    args = _args(DOCKERFILES[name])
    for keyword, arg in instructions(DOCKERFILES[name]):
        if keyword != "FROM":
            continue
        image = arg.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {"uv", "build"}:
            continue  # an earlier stage
        assert "@sha256:" in image or re.search(r":\d+\.\d+(\.\d+)?[-\w.]*$", image), (
            f"{name}: base image {image!r} is not pinned to a version"
        )
        assert ":latest" not in image


def test_operator_image() -> None:
    args = _args(OPERATOR)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    steps = instructions(OPERATOR)
    installs = [arg for keyword, arg in steps if keyword == "RUN" and "pip install" in arg]
    assert len(installs) == 1
    assert '".[operator]"' in installs[0] and "-c constraints.txt" in installs[0]
    assert "runtime" not in installs[0].split("pip install", 1)[1].split("&&")[0]  # no torch
    final = _final_stage(OPERATOR)
    assert ("USER", "65532:65532") in final
    assert ("ENTRYPOINT", '["spinctl", "operator"]') in final


def test_runtime_image() -> None:
    args = _args(RUNTIME)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[\w-]+-ubuntu\d\d\.\d\d", args["CUDA_IMAGE"])
    assert re.fullmatch(r"3\.11\.\d+", args["PYTHON_VERSION"])
    steps = instructions(RUNTIME)
    install = next(arg for keyword, arg in steps if keyword == "RUN" and "uv pip install" in arg)
    assert '".[runtime,vllm]"' in install and "--constraint /tmp/constraints.txt" in install
    # CUDA 13: the full lock; CUDA 12: the lock without its CUDA 13 wheels (the indexes bring cu12 ones)
    assert "13) cp images/runtime/constraints.txt /tmp/constraints.txt" in install
    assert (
        "12) grep -vE '^(nvidia-|cuda-)' images/runtime/constraints.txt > /tmp/constraints.txt"
        in install
    )
    assert (
        args["CUDA_MAJOR"] == "13" and args["TORCH_BACKEND"] == "" and args["EXTRA_INDEX_URL"] == ""
    )
    final = _final_stage(RUNTIME)
    assert ("USER", "65532:65532") in final
    env = " ".join(arg for keyword, arg in final if keyword == "ENV")
    for variable in ("HF_HOME", "SPIN_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT"):
        value = re.search(rf"\b{variable}=(\S+)", env)
        assert value and value.group(1).startswith("/var/cache/spin"), variable
    assert ("VOLUME", '["/var/cache/spin"]') in final
    settings = pytest.importorskip("spin_operator.settings")
    assert (
        settings.POD_CACHE_DIR == "/var/cache/spin"
    )  # where the operator mounts the Job's emptyDir


def test_runtime_lock_pins_a_compatible_ml_stack() -> None:
    pins = dict(
        line.split("==", 1)
        for line in RUNTIME_LOCK.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert all(re.fullmatch(r"[\w.+!-]+", version) for version in pins.values())
    # vllm 0.33.0 requires exactly torch 2.14.0 and transformers >=5.16.1,<5.21.
    assert pins["vllm"] == "0.33.0" and pins["torch"] == "2.14.0"
    major, minor, _ = (int(x) for x in pins["transformers"].split("."))
    assert (5, 16) <= (major, minor) < (5, 21)
    assert "spin-operator" not in pins


def test_no_secrets_in_images() -> None:
    for path in (OPERATOR, RUNTIME):
        for keyword, arg in instructions(path):
            if keyword in {"ENV", "ARG", "LABEL"}:
                assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*=", arg, re.I), (
                    path,
                    arg,
                )


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).strip("/")  # Docker cleans patterns like paths
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_admits_exactly_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allowlist: nothing enters the context unless listed"
    for path in (OPERATOR, RUNTIME):
        for keyword, arg in instructions(path):
            if keyword != "COPY" or arg.startswith("--from"):
                continue
            for source in arg.split()[:-1]:
                assert not _dockerignore_excludes(source.rstrip("/"), patterns), source
    for inside in (
        "operator/spin_operator/cli.py",
        "runtime/spin_common/storage.py",
        "pyproject.toml",
        "images/runtime/constraints.txt",
    ):
        assert not _dockerignore_excludes(inside, patterns), inside
    for outside in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "demo-work/run.log",
        "operator/spin_operator/__pycache__/cli.cpython-311.pyc",
        ".tools/bin/helm",
        "charts/spin-operator/values.yaml",
        "operator/.env",
    ):
        assert _dockerignore_excludes(outside, patterns), outside


def test_make_images_builds_both_images_for_cuda_13_or_12() -> None:
    """`make images` (docker buildx): shown with `make -n`, since no Docker engine runs here."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def plan(*args: str) -> list[str]:
        out = subprocess.run(
            ["make", "-s", "-n", "images", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return [
            " ".join(line.split())
            for line in out.stdout.replace("\\\n", " ").splitlines()
            if line.strip()
        ]

    default = plan()
    assert (
        default[0]
        == "docker buildx build --platform linux/amd64 --load -f images/operator/Dockerfile -t ghcr.io/spin-operator/operator:0.1.0 ."
    )
    assert (
        default[1]
        == "docker buildx build --platform linux/amd64 --load -f images/runtime/Dockerfile -t ghcr.io/spin-operator/runtime:0.1.0 ."
    )
    cu12 = plan("CUDA=12", "PUSH=1", "IMAGE_REGISTRY=registry.example.com/spin", "IMAGE_TAG=1.2.3")
    assert "--push" in cu12[1] and cu12[1].endswith(
        "-t registry.example.com/spin/runtime:1.2.3-cu12 ."
    )
    for arg in ("CUDA_MAJOR=12", "CUDA_IMAGE=nvidia/cuda:12.", "TORCH_BACKEND=cu12"):
        assert f"--build-arg {arg}" in cu12[1], arg
    lock = (ROOT / "images" / "runtime" / "constraints.txt").read_text()
    assert re.search(r"^vllm==0\.33\.0$", lock, re.M)  # the EXTRA_INDEX_URL names this version
    assert "wheels.vllm.ai/0.33.0/" in cu12[1]

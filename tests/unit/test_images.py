"""The project's images: content keys, build contexts and commands (pure: no podman)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localcluster.images import (
    ALL,
    IMAGE_PREFIX,
    BuiltImage,
    DebianBase,
    ImageError,
    Images,
    build_command,
    content_key,
    context_files,
    ctr_import_command,
    declared_args,
    file_parts,
    host_ca_bundle,
    image_key,
    missing_tool_message,
    pause_tag,
    specs,
    with_dependencies,
)

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("pyproject.toml", "README.md", "operator", "runtime")


def make_repo(root: Path) -> Path:
    files = {
        "pyproject.toml": "[project]\nname = 'x'\n",
        "README.md": "# x\n",
        "operator/Dockerfile": "ARG BASE=python:3.11-slim\nFROM ${BASE}\n",
        "operator/pkg/__init__.py": "",
        "operator/pkg/main.py": "print('operator')\n",
        "runtime/Dockerfile": "ARG BASE=python:3.11-slim\nFROM ${BASE}\n",
        "runtime/pkg/main.py": "print('runtime')\n",
        "docs/index.md": "docs\n",
        "tests/test_x.py": "def test(): pass\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def key_of(root: Path) -> str:
    files = file_parts(root, context_files(root, PROJECT))
    return image_key((root / "operator/Dockerfile").read_bytes(), "0123456789ab", files)


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture(params=["plain", "git"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    root = make_repo(tmp_path)
    if request.param == "git":
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        git(root, "init", "--quiet")
        (root / ".gitignore").write_text("*.log\nbuild/\n")
        git(root, "add", ".")
    return root


def test_key_is_twelve_hex_digits_and_stable(repo: Path) -> None:
    key = key_of(repo)
    assert len(key) == 12
    assert int(key, 16) >= 0
    assert key_of(repo) == key


def test_key_changes_when_a_copied_file_changes(repo: Path) -> None:
    before = key_of(repo)
    (repo / "operator/pkg/main.py").write_text("print('changed')\n")
    assert key_of(repo) != before


def test_key_changes_when_a_copied_file_is_added_removed_or_made_executable(repo: Path) -> None:
    before = key_of(repo)
    (repo / "runtime/pkg/new.py").write_text("")
    added = key_of(repo)
    assert added != before
    (repo / "runtime/pkg/new.py").unlink()
    assert key_of(repo) == before
    (repo / "runtime/pkg/main.py").chmod(0o755)
    assert key_of(repo) != before


def test_key_ignores_unrelated_files_and_caches(repo: Path) -> None:
    before = key_of(repo)
    (repo / "docs/index.md").write_text("other docs\n")
    (repo / "tests/test_y.py").write_text("")
    (repo / "operator/pkg/__pycache__").mkdir()
    (repo / "operator/pkg/__pycache__/main.cpython-311.pyc").write_bytes(b"\0")
    (repo / "operator/modeldeploy.egg-info").mkdir()
    (repo / "operator/modeldeploy.egg-info/PKG-INFO").write_text("x")
    assert key_of(repo) == before


def test_key_follows_gitignore_in_a_git_tree(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = make_repo(tmp_path)
    git(root, "init", "--quiet")
    (root / ".gitignore").write_text("*.log\n")
    before = key_of(root)
    (root / "runtime/debug.log").write_text("noise")
    assert key_of(root) == before
    assert "runtime/debug.log" not in context_files(root, PROJECT)


def test_key_covers_dockerfile_base_and_recipe() -> None:
    files = [("file - a.py", b"x")]
    key = image_key(b"FROM x", "aaaaaaaaaaaa", files)
    assert image_key(b"FROM y", "aaaaaaaaaaaa", files) != key
    assert image_key(b"FROM x", "bbbbbbbbbbbb", files) != key
    assert image_key(b"FROM x", "aaaaaaaaaaaa", files, [("module", b"v1")]) != key


def test_parts_cannot_run_into_each_other() -> None:
    assert content_key([("a", b"bc")]) != content_key([("ab", b"c")])
    assert content_key([("a", b"b"), ("c", b"")]) != content_key([("a", b"bc")])


def test_context_lists_exactly_what_the_dockerfiles_copy(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    assert context_files(root, PROJECT) == [
        "README.md",
        "operator/Dockerfile",
        "operator/pkg/__init__.py",
        "operator/pkg/main.py",
        "pyproject.toml",
        "runtime/Dockerfile",
        "runtime/pkg/main.py",
    ]
    assert context_files(root, ()) == []


def test_the_real_context_has_the_packages_and_no_caches() -> None:
    files = context_files(ROOT, PROJECT)
    assert "pyproject.toml" in files
    assert "runtime/requirements.txt" in files
    assert "operator/modeldeploy_operator/__init__.py" in files
    assert not [f for f in files if "__pycache__" in f or ".egg-info" in f]
    assert not [f for f in files if f.startswith(("tests/", "docs/", "bench/"))]


def test_debian_base_key_is_its_recipe() -> None:
    default = image_key(b"", recipe=DebianBase().recipe())
    assert image_key(b"", recipe=DebianBase().recipe()) == default
    assert image_key(b"", recipe=DebianBase(suite="trixie").recipe()) != default
    assert image_key(b"", recipe=DebianBase(mirror="http://m/debian").recipe()) != default


def test_debian_sources_are_deb822_for_the_suite() -> None:
    sources = DebianBase().sources()
    assert "Suites: bookworm bookworm-updates" in sources
    assert "Suites: bookworm-security" in sources
    assert "URIs: http://deb.debian.org/debian\n" in sources
    assert DebianBase().debootstrap_args(Path("/r")) == [
        "--variant=minbase",
        "bookworm",
        "/r",
        "http://deb.debian.org/debian",
    ]


def test_images_keys_chain_through_the_base(tmp_path: Path) -> None:
    images = Images(ROOT, tmp_path, "v1.36.3", out=io.StringIO())
    other = Images(ROOT, tmp_path, "v1.36.4", out=io.StringIO())
    assert images.key("pause") != other.key("pause")
    assert images.key("runtime") == other.key("runtime")
    assert images.key("runtime") != images.key("operator")
    runtime = images.image("runtime")
    assert runtime.reference == f"{IMAGE_PREFIX}runtime:{images.key('runtime')}"
    assert runtime.archive == tmp_path / "images" / f"runtime-{runtime.key}.tar"
    assert runtime.repository == "localhost/modeldeploy-runtime"


def test_warm_cache_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When every archive exists, nothing is built and no tool is run (not even podman)."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be built or run")

    monkeypatch.setattr(Images, "_build", fail)
    monkeypatch.setattr(Images, "_run", fail)
    out = io.StringIO()
    images = Images(ROOT, tmp_path, "v1.36.3", out=out)
    (tmp_path / "images").mkdir()
    for name in ALL:
        images.image(name).archive.write_bytes(b"")
    built = images.ensure_built(["operator"])
    assert list(built) == ["base", "operator"]
    assert "up to date" in out.getvalue()


def test_dependencies_come_first_and_unknown_names_fail() -> None:
    assert with_dependencies(["operator", "pause"]) == ["base", "pause", "operator"]
    assert with_dependencies(ALL) == list(ALL)
    with pytest.raises(ImageError, match="unknown image"):
        with_dependencies(["nope"])


def test_declared_args() -> None:
    text = "ARG BASE=python:3.11-slim\nFROM ${BASE}\narg VERSION\nARG A=1 B='2'\nRUN echo ARG X\n"
    assert declared_args(text) == {"BASE": "python:3.11-slim", "VERSION": None, "A": "1", "B": "2"}


@pytest.mark.parametrize("name", ["runtime", "operator"])
def test_project_dockerfiles_default_to_python_slim(name: str) -> None:
    args = declared_args((ROOT / name / "Dockerfile").read_text())
    assert args["BASE"] == "python:3.11-slim"


def test_every_dockerfile_declares_what_it_is_given() -> None:
    for spec in specs().values():
        if spec.dockerfile is None:
            continue
        text = (ROOT / spec.dockerfile).read_text()
        assert ("BASE" in declared_args(text)) == (spec.base is not None), spec.name
        for copied in spec.copies:
            assert (ROOT / copied).exists(), copied


def test_operator_image_has_a_passwd_entry_and_user_env() -> None:
    text = (ROOT / "operator/Dockerfile").read_text()
    assert "--uid 65532" in text
    assert "USER 65532:65532" in text
    assert "USER=modeldeploy LOGNAME=modeldeploy" in text
    assert "--uid 1000" in (ROOT / "runtime/Dockerfile").read_text()


def test_build_command() -> None:
    command = build_command(
        "podman",
        "localhost/modeldeploy-runtime:0123456789ab",
        Path("/repo/runtime/Dockerfile"),
        Path("/ctx"),
        {"BASE": "localhost/modeldeploy-base:ba5eba5eba5e"},
        {"cacert": Path("/etc/ssl/certs/ca-certificates.crt")},
    )
    assert command == [
        *("podman", "build", "--network", "host"),
        *("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--pull=never"),
        *("--file", "/repo/runtime/Dockerfile"),
        *("--tag", "localhost/modeldeploy-runtime:0123456789ab"),
        *("--build-arg", "BASE=localhost/modeldeploy-base:ba5eba5eba5e"),
        *("--secret", "id=cacert,src=/etc/ssl/certs/ca-certificates.crt"),
        "/ctx",
    ]


def test_ctr_import_names_the_image_by_its_repository() -> None:
    image = BuiltImage(
        "pause", "localhost/modeldeploy-pause:0123456789ab", Path("/c/pause-0123456789ab.tar")
    )
    assert ctr_import_command("ctr", Path("/run/c.sock"), image) == [
        *("ctr", "--address", "/run/c.sock", "--namespace", "k8s.io"),
        *("images", "import", "--base-name", "localhost/modeldeploy-pause"),
        *("--digests=false", "/c/pause-0123456789ab.tar"),
    ]


def test_pause_tag() -> None:
    assert pause_tag("REGISTRY ?= x\nTAG ?= 3.10.2\nREV = $(shell git)\n") == "3.10.2"
    assert pause_tag("nothing") is None


def test_host_ca_bundle_prefers_pip_cert(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    assert host_ca_bundle({"PIP_CERT": str(bundle)}) == bundle
    assert host_ca_bundle({"PIP_CERT": str(tmp_path / "missing")}) != tmp_path / "missing"


def test_missing_tools_name_their_debian_package() -> None:
    assert "apt-get install podman" in missing_tool_message("podman")
    assert "apt-get install debootstrap" in missing_tool_message("debootstrap")
    assert "apt-get install gcc libc6-dev" in missing_tool_message("gcc")
    assert "golang-go" in missing_tool_message("go")
    assert "\n" not in missing_tool_message("go")


FAKE_CTR = """\
#!{python}
import json, sys
from pathlib import Path

here = Path(sys.argv[0])
state = here.with_suffix(".json")
names = json.loads(state.read_text()) if state.exists() else []
args = sys.argv[1:]
with here.with_suffix(".log").open("a") as log:
    log.write(" ".join(args) + "\\n")
if "list" in args:
    print("\\n".join(names))
elif "import" in args:
    base = args[args.index("--base-name") + 1]
    tag = Path(args[-1]).stem.rsplit("-", 1)[1]
    names.append(f"{{base}}:{{tag}}" if {name_it} else "import-2026:latest")
    state.write_text(json.dumps(names))
"""


def fake_ctr(tmp_path: Path, *, present: list[str], name_it: bool = True) -> Path:
    ctr = tmp_path / "ctr"
    ctr.write_text(FAKE_CTR.format(python=sys.executable, name_it=name_it))
    ctr.chmod(0o755)
    (tmp_path / "ctr.json").write_text(json.dumps(present))
    return ctr


def built(tmp_path: Path, name: str, key: str) -> BuiltImage:
    archive = tmp_path / f"{name}-{key}.tar"
    archive.write_bytes(b"")
    return BuiltImage(name, f"{IMAGE_PREFIX}{name}:{key}", archive)


def test_import_into_skips_what_containerd_has(tmp_path: Path) -> None:
    pause = built(tmp_path, "pause", "0123456789ab")
    runtime = built(tmp_path, "runtime", "ba5eba5eba5e")
    ctr = fake_ctr(tmp_path, present=[pause.reference])
    images = Images(ROOT, tmp_path, "v1.36.3", out=io.StringIO())
    images.import_into([pause, runtime], ctr, tmp_path / "containerd.sock")
    calls = (tmp_path / "ctr.log").read_text().splitlines()
    imports = [call for call in calls if " import " in call]
    assert imports == [
        " ".join(ctr_import_command(str(ctr), tmp_path / "containerd.sock", runtime)[1:])
    ]


def test_import_into_fails_when_the_name_is_not_the_reference(tmp_path: Path) -> None:
    runtime = built(tmp_path, "runtime", "ba5eba5eba5e")
    ctr = fake_ctr(tmp_path, present=[], name_it=False)
    images = Images(ROOT, tmp_path, "v1.36.3", out=io.StringIO())
    with pytest.raises(ImageError, match="containerd has no localhost/modeldeploy-runtime"):
        images.import_into([runtime], ctr, tmp_path / "containerd.sock")

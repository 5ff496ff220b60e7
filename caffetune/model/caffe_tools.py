"""Finding the Caffe installation (binary, tools, pycaffe) and running its programs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from caffetune.errors import CaffeNotFound
from caffetune.model.schema import cache_dir

SEARCH_ORDER = "--caffe, $CAFFE_BIN, $CAFFE_ROOT/build/tools/caffe, PATH, the cache built by `make caffe`"
_FIX = ("run `make setup` (builds Caffe into the cache), or point caffetune at an existing build with --caffe "
        "PATH/TO/caffe, CAFFE_BIN, or CAFFE_ROOT")


@dataclass(frozen=True)
class CaffeInstall:
    """A Caffe build: its `caffe` binary, sibling tools and (when present) pycaffe."""

    binary: Path
    found_by: str

    @property
    def tools_dir(self) -> Path:
        return self.binary.parent

    def tool(self, name: str) -> Path:
        """Path of a sibling tool such as convert_imageset or compute_image_mean."""
        for candidate in (self.tools_dir / name, self.tools_dir / f"{name}.bin"):
            if candidate.is_file():
                return candidate
        found = shutil.which(name)
        if found:
            return Path(found)
        raise CaffeNotFound(f"Caffe tool {name} not found next to {self.binary}", fix=_FIX)

    @cached_property
    def pycaffe_dir(self) -> Path | None:
        """The folder to put on PYTHONPATH so that `import caffe` gives this build's pycaffe."""
        candidates = []
        if os.environ.get("CAFFE_ROOT"):
            candidates.append(Path(os.environ["CAFFE_ROOT"]) / "python")
        prefix = self.binary.parent.parent
        candidates += [prefix / "lib" / "python3" / "dist-packages",  # CMake install (Debian's layout)
                       prefix / "python",                            # make-based install: PREFIX/bin/caffe
                       prefix.parent / "python"]                     # source tree: ROOT/build/tools/caffe
        return next((c for c in candidates if (c / "caffe" / "__init__.py").is_file()), None)

    @cached_property
    def version(self) -> str:
        result = run_quiet([str(self.binary), "--version"])
        match = re.search(r"version\s+(\S+)", result.stdout + result.stderr)
        return match.group(1) if match else "unknown"

    @cached_property
    def is_cuda(self) -> bool:
        """Whether the build links CUDA (a CPU_ONLY build cannot use a GPU)."""
        result = run_quiet(["ldd", str(self.binary)])
        return "libcudart" in result.stdout or "libcublas" in result.stdout

    def env(self, base: dict | None = None) -> dict:
        """An environment in which `python -c 'import caffe'` imports this build's pycaffe, and in which the Python
        that the caffe binary embeds (for Python layers) finds this virtualenv's packages too: that interpreter
        starts from its base installation's site-packages, whose numpy may not be the one pycaffe was built for."""
        env = dict(os.environ if base is None else base)
        folders = [str(self.pycaffe_dir) if self.pycaffe_dir else None, env.get("PYTHONPATH"), _virtualenv_packages()]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, os.pathsep.join(filter(None, folders))
                                                                 .split(os.pathsep))))
        return env


def _virtualenv_packages() -> str | None:
    """This virtualenv's site-packages (None outside a virtualenv), for interpreters that do not know the venv."""
    return sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else None


_GLOG_PREFIX = re.compile(r"^[FEWI]\d{4,8} [\d:.]+\s+\d+ \S+\] ")


def strip_glog_prefix(line: str) -> str:
    """A glog line without its "F1122 10:00:00.123 4242 net.cpp:42] " prefix (severity, time, thread, source)."""
    return _GLOG_PREFIX.sub("", line)


def is_fatal_line(line: str) -> bool:
    """Whether a line is glog's FATAL record ("F1122 ...] Check failed: ..."), the reason Caffe aborted."""
    return line[:1] == "F" and line[1:5].isdigit() and "] " in line


def pycaffe_env(install: CaffeInstall) -> dict:
    """The environment of a child process that imports this build's pycaffe, glog quiet (warnings and up)."""
    env = install.env()
    env["GLOG_minloglevel"] = "2"
    return env


def run_pycaffe(install: CaffeInstall, script: str, args: list[str], timeout: float | None = None
                ) -> subprocess.CompletedProcess:
    """Run a Python `script` that imports this build's pycaffe in a child process (see pycaffe_env). A child,
    because a Caffe CHECK failure aborts the whole process; raises subprocess.TimeoutExpired."""
    return subprocess.run([sys.executable, "-c", script, *args], env=pycaffe_env(install), capture_output=True,
                          text=True, timeout=timeout)


def run_quiet(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, **kwargs)
    except OSError as error:
        return subprocess.CompletedProcess(command, 127, "", str(error))


def _cached_builds() -> list[Path]:
    """Binaries built by `make caffe`, the one matching this Python first."""
    pytag = f"-py{sys.version_info[0]}{sys.version_info[1]}-"
    builds = sorted(cache_dir().glob("caffe-*/install/bin/caffe"), key=lambda p: (pytag not in str(p), str(p)))
    return [b for b in builds if (b.parent.parent / ".complete").exists()]


def _candidates(explicit: str | Path | None):
    if explicit:
        yield Path(explicit), "--caffe"
    if os.environ.get("CAFFE_BIN"):
        yield Path(os.environ["CAFFE_BIN"]), "CAFFE_BIN"
    if os.environ.get("CAFFE_ROOT"):
        yield Path(os.environ["CAFFE_ROOT"]) / "build" / "tools" / "caffe", "CAFFE_ROOT"
    on_path = shutil.which("caffe")
    if on_path:
        yield Path(on_path), "PATH"
    for build in _cached_builds():
        yield build, "cache"


def find_caffe(explicit: str | Path | None = None) -> CaffeInstall:
    """The first Caffe binary in the search order; an explicit path that is wrong is an error, not skipped."""
    for path, found_by in _candidates(explicit):
        if path.is_file() and os.access(path, os.X_OK):
            return CaffeInstall(binary=path.resolve(), found_by=found_by)
        if found_by in ("--caffe", "CAFFE_BIN"):
            raise CaffeNotFound(f"{found_by} names {path}, which is not an executable caffe binary",
                                fix="give the path of the `caffe` binary (build/tools/caffe)")
    raise CaffeNotFound(f"no caffe binary found (searched {SEARCH_ORDER})", fix=_FIX)


def visible_gpus() -> list[str]:
    """GPU names reported by nvidia-smi (empty when there is none or no driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    result = run_quiet(["nvidia-smi", "-L"])
    return [line.strip() for line in result.stdout.splitlines() if line.startswith("GPU ")]


def pycaffe_status(install: CaffeInstall) -> tuple[bool, str]:
    """Whether this build's pycaffe imports (checked in a subprocess: a broken build must not kill the caller)."""
    if install.pycaffe_dir is None:
        return False, "no pycaffe next to the binary (build Caffe with -DBUILD_python=ON)"
    result = run_pycaffe(install, "import caffe; print(caffe.__file__)", [])
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, last
    return True, result.stdout.strip()


def import_pycaffe(install: CaffeInstall | None = None):
    """Import this build's pycaffe in the current process (quiet glog unless the caller set its level)."""
    install = install or find_caffe()
    if install.pycaffe_dir is None:
        raise CaffeNotFound(f"pycaffe not found for {install.binary}", fix=_FIX)
    if str(install.pycaffe_dir) not in sys.path:
        sys.path.insert(0, str(install.pycaffe_dir))
    # glog reads its level from the environment when libcaffe loads; quiet it for this import only, so that
    # caffe processes started later by this process still log (their log is what caffetune reads).
    previous = os.environ.get("GLOG_minloglevel")
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe  # noqa: PLC0415 - imported on demand from the build's folder
    except ImportError as error:
        raise CaffeNotFound(f"pycaffe at {install.pycaffe_dir} does not import: {error}",
                            fix="run `make setup` so the venv has numpy<2, scikit-image and six") from None
    finally:
        if previous is None:
            os.environ.pop("GLOG_minloglevel", None)
        else:
            os.environ["GLOG_minloglevel"] = previous
    return caffe

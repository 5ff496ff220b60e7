"""`caffetune doctor`: what caffetune will use, and what is missing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from caffetune.errors import CaffetuneError
from caffetune.model import caffe_tools, schema


@dataclass
class Report:
    caffe: str | None = None
    caffe_found_by: str | None = None
    caffe_version: str | None = None
    build: str | None = None            # "CPU_ONLY" or "CUDA"
    gpus: list[str] = field(default_factory=list)
    pycaffe: str | None = None          # the imported module's path when it imports
    schema: str | None = None
    schema_sha256: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _check_caffe(report: Report, explicit) -> None:
    try:
        install = caffe_tools.find_caffe(explicit)
    except CaffetuneError as error:
        report.problems.append(str(error))
        return
    report.caffe, report.caffe_found_by = str(install.binary), install.found_by
    report.caffe_version = install.version
    report.build = "CUDA" if install.is_cuda else "CPU_ONLY"
    report.gpus = caffe_tools.visible_gpus()
    imports, detail = caffe_tools.pycaffe_status(install)
    if imports:
        report.pycaffe = detail
    else:
        report.problems.append(f"pycaffe does not import: {detail}\n  fix: run `make setup`")


def _check_schema(report: Report, proto) -> None:
    try:
        loaded = schema.load(proto)
        loaded.message_class("NetParameter")
    except CaffetuneError as error:
        report.problems.append(str(error))
        return
    report.schema, report.schema_sha256 = loaded.source, loaded.sha256


def diagnose(caffe: str | None = None, proto: str | None = None) -> Report:
    report = Report()
    _check_caffe(report, caffe)
    _check_schema(report, proto)
    return report

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caffetune.model import caffe_tools  # noqa: E402
from caffetune.errors import CaffeNotFound  # noqa: E402


@pytest.fixture(scope="session")
def caffe_install() -> caffe_tools.CaffeInstall:
    """The real Caffe built by `make setup`. Missing Caffe fails the test: these tests must run in CI."""
    try:
        return caffe_tools.find_caffe()
    except CaffeNotFound as error:
        pytest.fail(f"the real Caffe is required: {error}")


@pytest.fixture(scope="session")
def caffe_source():
    from helpers import caffe_source_tree

    tree = caffe_source_tree()
    if not (tree / "models").is_dir():
        pytest.fail(f"the pinned Caffe source is missing at {tree}: run `make setup`")
    return tree

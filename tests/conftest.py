"""Fixtures for the real Caffe, and the test tiers.

Tiers: a test that takes the `caffe_install` fixture (directly or through another fixture) needs the Caffe binary
or pycaffe built by `make setup`, and is marked `caffe` here automatically; a test that downloads (the demo's
model from PyPI) is marked `network` by hand. `make check` runs the others (`pytest -m "not caffe and not
network"`: the venv, the apt packages and the schema are enough); `make test` runs everything.
"""
from __future__ import annotations

import pytest

from caffetune.errors import CaffeNotFound
from caffetune.model import caffe_tools

CAFFE_FIXTURES = frozenset({"caffe_install"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if CAFFE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.caffe)


@pytest.fixture(scope="session", autouse=True)
def _feature_cache_outside_the_user_cache(tmp_path_factory):
    """`caffetune run` caches a frozen trunk's outputs (on by default): tests keep them in a temporary folder."""
    import os

    if "CAFFETUNE_FEATURE_CACHE" not in os.environ:
        os.environ["CAFFETUNE_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))


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

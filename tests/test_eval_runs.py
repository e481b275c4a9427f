"""Run metadata: the versions every run records."""

import importlib.metadata

import kvforge
from kvforge.eval.runs import versions


def test_versions_from_a_source_tree_without_package_metadata(monkeypatch):
    """Run from a source tree (PYTHONPATH=src), kvforge has no installed metadata: versions() must still answer
    (it used to raise PackageNotFoundError after a run's work was done, losing the run's meta)."""

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert versions()["kvforge"] == kvforge.__version__


def test_package_version_matches_the_installed_metadata():
    assert kvforge.__version__ == importlib.metadata.version("kvforge")

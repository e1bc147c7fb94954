"""Library versions tagged on every campaign: mlflow-skinny counts as mlflow."""

from __future__ import annotations

import importlib.metadata as md

from search.tracking import library_versions


def test_mlflow_skinny_is_reported_as_mlflow(monkeypatch):
    real = md.version

    def version(dist):
        if dist == "mlflow":
            raise md.PackageNotFoundError(dist)
        if dist == "mlflow-skinny":
            return "3.0.1"
        if dist == "timm":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", version)
    out = library_versions()
    assert out["mlflow"] == "3.0.1 (mlflow-skinny)"
    assert out["timm"] == "missing"
    assert out["torch"] == real("torch")

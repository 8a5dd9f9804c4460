"""Build the sample disk with the committed script, as a fresh sparse file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import FIXTURES


def fresh_sample(outdir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_samples", FIXTURES / "make_samples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_sample(outdir)

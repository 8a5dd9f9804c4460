"""Random header bytes must never crash imagetool (exit 1) or hang it."""

from __future__ import annotations

import struct

import pytest
from conftest import make_qcow2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(min_size=1, max_size=4096))
def test_random_bytes_never_exit_1(cli, tmp_path, blob):
    image = tmp_path / "fuzz.img"
    image.write_bytes(blob)
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err
    assert result.json["schema"] == "imagetool.inspect/1"


@FUZZ
@given(st.integers(0, 103), st.binary(min_size=1, max_size=8))
def test_mutated_qcow2_headers_never_exit_1(cli, tmp_path, offset, blob):
    image = tmp_path / "m.qcow2"
    if not image.exists():
        make_qcow2(image, "16M")
    pristine = image.with_suffix(".orig")
    if not pristine.exists():
        pristine.write_bytes(image.read_bytes())
    data = bytearray(pristine.read_bytes())
    data[offset : offset + len(blob)] = blob
    image.write_bytes(bytes(data[: len(pristine.read_bytes())]))
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_any_qcow2_virtual_size_is_handled(cli, tmp_path, size):
    image = tmp_path / "s.qcow2"
    if not image.exists():
        make_qcow2(image, "16M")
    with image.open("r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", size))
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err
    if result.code == 0:
        assert result.json["virtual_size"] == size

"""Random header bytes must never crash imagetool (exit 1) or hang it."""

from __future__ import annotations

import struct

import pytest
from conftest import make_qcow2, qemu_img
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


def _mutated_copy(tmp_path, name, make, offset, blob):
    """The image `make` builds once per test, with `blob` written over it at `offset`."""
    pristine = tmp_path / f"{name}.orig"
    if not pristine.exists():
        make(pristine)
    data = bytearray(pristine.read_bytes())
    offset %= len(data)
    data[offset : offset + len(blob)] = blob
    image = tmp_path / name
    image.write_bytes(bytes(data[: len(pristine.read_bytes())]))
    return image


@FUZZ
@given(st.integers(-512, -1), st.binary(min_size=1, max_size=8))
def test_mutated_fixed_vhd_footers_never_exit_1(cli, tmp_path, offset, blob):
    """Any footer field, with its checksum kept valid so the sizes and types are what gets tested."""

    def make(path):
        qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", path, "1M")

    image = _mutated_copy(tmp_path, "f.vhd", make, offset, blob)
    data = bytearray(image.read_bytes())
    footer = data[-512:]
    struct.pack_into(">I", footer, 64, ~(sum(footer) - sum(footer[64:68])) & 0xFFFFFFFF)
    data[-512:] = footer
    image.write_bytes(bytes(data))
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err


@FUZZ
@given(
    st.one_of(st.integers(0x30000, 0x30000 + 80), st.integers(0x300000, 0x300000 + 6 * 32)),
    st.binary(min_size=1, max_size=8),
)
def test_mutated_vhdx_regions_never_exit_1(cli, tmp_path, offset, blob):
    """The region table and the metadata table: every field oslo's VHDX parser follows."""
    image = _mutated_copy(
        tmp_path, "d.vhdx", lambda p: qemu_img("create", "-q", "-f", "vhdx", p, "8M"), offset, blob
    )
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "# c",
                " ",
                "\r",
                "version=1",
                "version=9",
                'createType="monolithicSparse"',
                'createType="monolithicFlat"',
                'RW 8 SPARSE "x.vmdk"',
                'RW 8 FLAT "/x" 0',
                'ddb.a = "1"',
                "\x00",
                "\xff",
                "KDMV",
            ]
        ),
        max_size=12,
    )
)
def test_text_descriptor_fragments_never_exit_1(cli, tmp_path, lines):
    image = tmp_path / "d.vmdk"
    image.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    result = cli("inspect", image, "--json")
    assert result.code in (0, 3, 4), result.err

"""Every limit imagetool enforces, in one place, with the reason code and exit code it carries.

The limits come from the image library (docs/image-library.md) or bound the work
a hostile file can cause (docs/unsafe-images.md). Operations import them from
here, so a limit and the way it fails never drift apart between commands.
"""

from __future__ import annotations

from imagetool.sizes import GiB, MiB, TiB

# The library refuses images whose compressed qcow2 is bigger (reason compressed_too_large, exit 4).
MAX_COMPRESSED_SIZE = 50 * GiB
# The smallest --max-compressed-size that makes sense: a qcow2 header, L1 and refcounts alone
# take a few clusters. Anything lower is a typo, refused as a usage error (exit 2).
MIN_COMPRESSED_SIZE = 1 * MiB
# No server or volume in the library is bigger (reason too_large, exit 4).
MAX_VIRTUAL_SIZE = 4 * TiB
# The library fails snapshots whose non-zero data is bigger (warning for uploads, failure for snapshot).
MAX_DISK_SIZE = 50 * GiB

# Work a hostile file can cause, bounded before it is done (reason in brackets, exit 3).
# `qemu-img map` lines an image may have [too_fragmented]: a 50 GB disk written by a real guest
# has tens of thousands; a crafted 36 KiB qcow2 can claim millions.
MAX_MAP_EXTENTS = 1_000_000
# qcow2 header counts that make qemu-img itself slow or greedy [header_limits]:
MAX_QCOW2_SNAPSHOTS = 1024
MAX_QCOW2_L1_BYTES = 32 * MiB  # qemu's own QCOW_MAX_L1_SIZE
MAX_QCOW2_REFCOUNT_TABLE_BYTES = 8 * MiB  # qemu's QCOW_MAX_REFTABLE_SIZE

# Small files imagetool reads that are not images (metadata JSON): a cap, not a guess.
MAX_METADATA_BYTES = 1 * MiB
# How deep a metadata document may nest (ours nest 3 deep).
MAX_JSON_DEPTH = 32

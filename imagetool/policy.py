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
# `qemu-img map` lines an image may have [too_fragmented]. What it costs: qemu-img prints ~2 us
# a line, imagetool parses alongside (~1.5 us, 24 bytes kept a line), then keeps ~130 bytes and
# spends ~3 us (Extent, disk_size scan) per data range (bench/disk_size_bench.py, 2 shared
# cores): at 500,000 a crafted map is refused in 2-3 s and 60 MB, and an image just under it
# is inspected in 4-5 s and 125 MB; at 1,000,000 that was 7-10 s and 200 MB. What honest disks
# have: a line covers at least one cluster, and disks written by real guests have tens of
# thousands; 500,000 lines hold 30 GiB of qcow2's (or VMDK's) 64 KiB clusters with no two
# adjacent in the file, or any 50 GiB of them where fewer than 61% start a new run (VDI, VHD
# and VHDX blocks are 1 MiB or more: 50 GiB is at most 51,200). Past it, `qemu-img convert`
# makes a defragmented copy. A crafted 36 KiB qcow2 (every L2 entry pointing at one cluster)
# claims 1,048,576 (tests/test_fragmented.py).
MAX_MAP_EXTENTS = 500_000
# qcow2 header counts that make qemu-img itself slow or greedy [header_limits]:
MAX_QCOW2_SNAPSHOTS = 1024
MAX_QCOW2_L1_BYTES = 32 * MiB  # qemu's own QCOW_MAX_L1_SIZE
MAX_QCOW2_REFCOUNT_TABLE_BYTES = 8 * MiB  # qemu's QCOW_MAX_REFTABLE_SIZE

# Small files imagetool reads that are not images (metadata JSON): a cap, not a guess.
MAX_METADATA_BYTES = 1 * MiB
# How deep a metadata document may nest (ours nest 3 deep).
MAX_JSON_DEPTH = 32

# A backing chain `snapshot` follows is at most this deep [chain_too_deep]: a disk with its
# base images, not a crafted loop of references.
MAX_CHAIN_DEPTH = 16

# A temp URL handed to the library must still work this long after register asks for the
# download (registration is asynchronous: the library fetches the image after answering).
URL_MARGIN_SECONDS = 10 * 60

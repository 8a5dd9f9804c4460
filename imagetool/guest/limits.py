"""Every bound a guest look enforces, in one place.

A disk image is untrusted: its partition table, filesystems, symlinks and files are
written by whoever made it. Each number here caps the work one hostile structure can
cause, so a look always ends quickly with answers or with evidence of what stopped it.
"""

from __future__ import annotations

from imagetool.sizes import GiB, KiB, MiB

# The whole look: a deadline checked between steps, inside loops and on every image read.
DEFAULT_TIME_LIMIT = 10.0
# Bytes read from the image file in one look. An honest look reads tens of MiB (metadata,
# a few small files and one compressed initramfs); a hostile filesystem that makes a reader
# loop over its blocks stops here.
MAX_IMAGE_BYTES = 1 * GiB
# Bytes the guest disk hands out (qcow2 makes zeros for unallocated clusters without reading
# the file: a partition table claiming millions of entries would otherwise read gigabytes of
# nothing), and the most one read may ask for (no structure the look needs is bigger).
MAX_GUEST_BYTES = 2 * GiB
MAX_SINGLE_READ = 64 * MiB
# Symlinks followed while resolving one guest path (Linux's own limit is 40).
MAX_LINK_HOPS = 40
# A symlink's target (Linux's PATH_MAX); a "link" claiming more is hostile.
MAX_LINK_TARGET = 4 * KiB
# Entries read from one directory while looking a name up or listing it.
MAX_DIR_ENTRIES = 100_000
# Small text files: os-release, fstab, cloud-init YAML, grub.cfg, grubenv.
MAX_CONFIG_BYTES = 1 * MiB
# Kernel lists: /boot/config-<ver> (~250 KiB), modules.builtin, modules.dep (~0.5 MiB).
MAX_KERNEL_LIST_BYTES = 4 * MiB
# cloud.cfg.d files read (lexical order; more than this is hostile or broken).
MAX_CLOUD_CFG_FILES = 128
# Kernels considered (directories of /lib/modules, images in /boot).
MAX_KERNELS = 32
# Initramfs: compressed bytes read, bytes after decompression, cpio entries walked.
MAX_INITRAMFS_BYTES = 512 * MiB
MAX_INITRAMFS_UNPACKED = 512 * MiB
MAX_INITRAMFS_ENTRIES = 200_000
# A cpio member name (the kernel's own limit is PATH_MAX).
MAX_CPIO_NAME = 4 * KiB
# Filesystems opened in one image (partitions, including logical ones).
MAX_VOLUMES = 64
# GPT entries a header may claim (the specification's arrays hold 128).
MAX_GPT_ENTRIES = 1024

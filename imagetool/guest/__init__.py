"""Look inside a guest disk image: architecture, virtio readiness, default username, OS.

`look(src, fmt)` reads the image's partitions and filesystems directly (read-only,
through the caller's descriptor, no VM, no root) and answers with confidence and
evidence; see docs/guest-reading.md. The readers (dissect.*) are imported only when a
look runs, so importing this package costs nothing at start-up.
"""

from __future__ import annotations

from imagetool.guest.facts import Answer, DriverFacts, GuestFacts, InitramfsFacts, KernelFacts
from imagetool.guest.look import look

__all__ = ["Answer", "DriverFacts", "GuestFacts", "InitramfsFacts", "KernelFacts", "look"]

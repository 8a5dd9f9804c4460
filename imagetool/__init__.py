"""imagetool: prepare virtual-disk images for a cloud image library, safely."""

__version__ = "0.1.0"

"""The guest's architecture, from the headers of the programs and kernel it would run.

Linux: the ELF header of /bin/sh (else /bin/bash, /sbin/init), reached through the
guest's own links: e_ident[EI_CLASS] (1 = 32-bit, 2 = 64-bit), e_ident[EI_DATA] (byte
order) and e_machine (3 = EM_386, 62 = EM_X86_64, 183 = EM_AARCH64 ...). The default
kernel's x86 boot header is a second witness: a bzImage with boot protocol 2.12 or later
sets XLF_KERNEL_64 (bit 0 of xloadflags at 0x236) only when it is a 64-bit kernel, and a
64-bit kernel needs an x86_64 server even under a 32-bit userland.
Windows: the PE header of Windows/System32/cmd.exe (Machine 0x14c = i386, 0x8664 = AMD64).
"""

from __future__ import annotations

from imagetool.guest.facts import CERTAIN, LIKELY, SUPPORTED_ARCHES, Answer, unknown
from imagetool.guest.files import GuestTree
from imagetool.guest.filesystems import GuestPathError
from imagetool.guest.text import short_error

PROGRAMS = ("/bin/sh", "/bin/bash", "/sbin/init")
WINDOWS_PROGRAM = "/Windows/System32/cmd.exe"

_EM_NAMES = {
    2: "EM_SPARC",
    3: "EM_386",
    8: "EM_MIPS",
    20: "EM_PPC",
    21: "EM_PPC64",
    22: "EM_S390",
    40: "EM_ARM",
    43: "EM_SPARCV9",
    50: "EM_IA_64",
    62: "EM_X86_64",
    183: "EM_AARCH64",
    243: "EM_RISCV",
    258: "EM_LOONGARCH",
}


def elf_arch(head: bytes) -> tuple[str, str] | None:
    """(architecture, the header bytes that say so) for an ELF header, else None."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    elf_class, data = head[4], head[5]
    if elf_class not in (1, 2) or data not in (1, 2):
        return None
    machine = int.from_bytes(head[18:20], "little" if data == 1 else "big")
    bits = 32 if elf_class == 1 else 64
    arch = {
        (1, 3): "i686",
        (2, 62): "x86_64",
        (1, 62): "x32",
        (2, 183): "aarch64",
        (1, 40): "arm",
        (2, 243): "riscv64",
        (1, 243): "riscv32",
        (2, 21): "ppc64le" if data == 1 else "ppc64",
        (1, 20): "ppc",
        (2, 22): "s390x",
        (2, 8): "mips64el" if data == 1 else "mips64",
        (1, 8): "mipsel" if data == 1 else "mips",
        (2, 258): "loongarch64",
        (2, 50): "ia64",
        (2, 43): "sparc64",
        (1, 2): "sparc",
    }.get((elf_class, machine), f"elf-{bits}-machine-{machine}")
    said = (
        f"ELF e_ident[EI_CLASS]={elf_class} ({bits}-bit), e_ident[EI_DATA]={data} "
        f"({'little' if data == 1 else 'big'}-endian), e_machine=0x{machine:x} "
        f"({_EM_NAMES.get(machine, 'unlisted')})"
    )
    return arch, said


def kernel_arch(head: bytes) -> tuple[str, str] | None:
    """(x86_64 or i686, the header bytes) for an x86 bzImage with boot protocol >= 2.12, else None."""
    if len(head) < 0x238 or head[0x202:0x206] != b"HdrS":
        return elf_arch(head)
    version = int.from_bytes(head[0x206:0x208], "little")
    if version < 0x020C:
        return None
    xloadflags = int.from_bytes(head[0x236:0x238], "little")
    arch = "x86_64" if xloadflags & 1 else "i686"
    return arch, (
        f"x86 boot header 'HdrS' protocol {version >> 8}.{version & 0xFF}, "
        f"xloadflags=0x{xloadflags:x} (XLF_KERNEL_64 {'set' if xloadflags & 1 else 'clear'})"
    )


def pe_arch(head: bytes) -> tuple[str, str] | None:
    if len(head) < 0x40 or head[:2] != b"MZ":
        return None
    lfanew = int.from_bytes(head[0x3C:0x40], "little")
    if lfanew + 26 > len(head) or head[lfanew : lfanew + 4] != b"PE\x00\x00":
        return None
    machine = int.from_bytes(head[lfanew + 4 : lfanew + 6], "little")
    magic = int.from_bytes(head[lfanew + 24 : lfanew + 26], "little")
    arch = {0x14C: "i686", 0x8664: "x86_64", 0xAA64: "aarch64", 0x1C4: "arm"}.get(machine, f"pe-{machine:x}")
    kind = {0x10B: "PE32", 0x20B: "PE32+"}.get(magic, f"optional header magic 0x{magic:x}")
    return arch, f"{kind}, COFF Machine=0x{machine:x}"


def _answer(arch: str, confidence: str, evidence: list[str]) -> Answer:
    supported = arch in SUPPORTED_ARCHES
    if not supported:
        evidence.append(f"{arch} is not an architecture the image library runs (only i686 and x86_64)")
    return Answer(
        arch, "certain" if confidence == CERTAIN else LIKELY, tuple(evidence), (("supported", supported),)
    )


def read_arch(tree: GuestTree, kernel_image: str | None) -> Answer:
    evidence: list[str] = []
    program: tuple[str, str] | None = None
    for path in PROGRAMS:
        try:
            found, head = tree.head(path, 64)
        except GuestPathError as exc:
            evidence.append(str(exc))
            continue
        except Exception as exc:
            evidence.append(f"{path}: {short_error(exc)}")
            continue
        program = elf_arch(head)
        if program is None:
            evidence.append(f"{found.describe()}: not an ELF file (starts {head[:4]!r})")
            continue
        evidence.append(f"{found.describe()}: {program[1]}")
        break
    kernel: tuple[str, str] | None = None
    if kernel_image:
        try:
            kfound, khead = tree.head(kernel_image, 0x240)
            kernel = kernel_arch(khead)
            if kernel:
                evidence.append(f"{kfound.describe()} (default kernel): {kernel[1]}")
        except Exception as exc:
            evidence.append(f"{kernel_image}: {short_error(exc)}")
    if program is None:
        if kernel is not None:
            return _answer(kernel[0], LIKELY, [*evidence, "no program header read: the kernel's alone"])
        return unknown(*evidence, "no ELF program found", extra=(("supported", None),))
    if kernel is not None and kernel[0] != program[0]:
        if program[0] == "i686" and kernel[0] == "x86_64":
            evidence.append("a 64-bit kernel under a 32-bit userland: it needs an x86_64 server")
            return _answer("x86_64", LIKELY, evidence)
        evidence.append(f"the default kernel says {kernel[0]}, the userland {program[0]}: they disagree")
        return _answer(program[0], LIKELY, evidence)
    return _answer(program[0], CERTAIN, evidence)


def read_windows_arch(tree: GuestTree) -> Answer:
    try:
        found, head = tree.head(WINDOWS_PROGRAM, 4096)
    except Exception as exc:
        return unknown(f"{WINDOWS_PROGRAM}: {short_error(exc)}", extra=(("supported", None),))
    said = pe_arch(head)
    if said is None:
        return unknown(f"{found.describe()}: not a PE file", extra=(("supported", None),))
    return _answer(said[0], CERTAIN, [f"{found.describe()}: {said[1]}"])

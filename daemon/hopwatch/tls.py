"""Where OpenSSL lives on this node, and which processes' TLS cannot be observed.

The TLS capture attaches uprobes to files: a uprobe on a file applies to every process that
maps it, now or later. So it is enough to find each distinct OpenSSL copy once:

* shared libraries named ``*ssl*`` in the usual library folders and in every process's
  ``/proc/<pid>/maps`` (opened through ``/proc/<pid>/root`` so a container's copy is its own
  file), and
* executables that export ``SSL_*`` themselves (Node.js embeds OpenSSL): the binaries of
  the usual ``bin`` folders, every running process's ``/proc/<pid>/exe``, and each new
  program image (the capture's exec events call :meth:`SslFinder.scan_pid`).

A file counts when its dynamic symbol table defines ``SSL_read`` and ``SSL_write`` (NSS's
``libssl3.so`` does not). Files are identified by (device, inode), checked once per
(device, inode, mtime), and reported once.

Not observable (no exported OpenSSL functions to probe): BoringSSL linked statically
without symbols (the grpcio wheel), Go's crypto/tls, rustls, Java's JSSE, and any OpenSSL
linked statically with its symbols hidden. :func:`unobservable_processes` lists the running
processes that hold TCP connections but map no OpenSSL the capture can probe.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass, field

from ._compat import SLOTS

__all__ = [
    "SSL_FUNCTIONS",
    "ElfInfo",
    "SslFinder",
    "SslTarget",
    "Unobservable",
    "elf_info",
    "unobservable_processes",
]

#: The functions the capture probes (entry and return; SSL_ctrl: entry only, for SNI).
SSL_FUNCTIONS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex", "SSL_ctrl")
_REQUIRED = ("SSL_write", "SSL_read")

LIB_GLOBS = (
    "/usr/lib/*/libssl.so*",
    "/lib/*/libssl.so*",
    "/usr/lib/libssl.so*",
    "/usr/lib64/libssl.so*",
    "/lib64/libssl.so*",
    "/usr/local/lib/libssl.so*",
    "/usr/local/lib64/libssl.so*",
    "/usr/local/ssl/lib/libssl.so*",
    "/usr/lib/*/libnode.so*",
    "/usr/lib/libnode.so*",
)
BIN_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")

_SHT_DYNSYM = 11
_STT_FUNC = 2
_STT_GNU_IFUNC = 10


@dataclass(frozen=True, **SLOTS)
class ElfInfo:
    symbols: dict[str, int]  # wanted function -> st_value (virtual address)
    is_go: bool  # a Go binary (crypto/tls is not observable)


def elf_info(path: str, wanted: tuple[str, ...] = SSL_FUNCTIONS) -> ElfInfo | None:
    """The defined dynamic FUNC symbols among ``wanted`` of a 64-bit little-endian ELF file.

    None when ``path`` is not such a file (or cannot be read). Reads the section headers,
    the dynamic string table and, only when a wanted name occurs in it, the symbol table.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            shoff = struct.unpack_from("<Q", head, 0x28)[0]
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            if shoff == 0 or shentsize != 64 or not 0 < shnum < 65280:
                return None
            f.seek(shoff)
            raw = f.read(shnum * 64)
            if len(raw) < shnum * 64:
                return None
            sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * 64) for i in range(shnum)]
            is_go = False
            if shstrndx < shnum:
                names_sh = sections[shstrndx]
                f.seek(names_sh[4])
                shstr = f.read(min(names_sh[5], 1 << 20))
                is_go = b"\0.go.buildinfo\0" in shstr or b"\0.gopclntab\0" in shstr
            symbols: dict[str, int] = {}
            dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
            if dynsym is None or dynsym[6] >= shnum or dynsym[9] != 24:
                return ElfInfo(symbols, is_go)
            strtab_sh = sections[dynsym[6]]
            f.seek(strtab_sh[4])
            strtab = f.read(strtab_sh[5])
            offsets: dict[int, str] = {}
            for name in wanted:
                needle = b"\0" + name.encode() + b"\0"
                at = strtab.find(needle)
                while at >= 0:
                    offsets[at + 1] = name
                    at = strtab.find(needle, at + 1)
            if not offsets:
                return ElfInfo(symbols, is_go)
            f.seek(dynsym[4])
            table = f.read(dynsym[5])
    except OSError:
        return None
    for st_name, st_info, _other, st_shndx, st_value, _size in struct.iter_unpack(
        "<IBBHQQ", table[: len(table) - len(table) % 24]
    ):
        found = offsets.get(st_name)
        if found is None or st_shndx == 0 or st_value == 0:
            continue
        if st_info & 0xF in (_STT_FUNC, _STT_GNU_IFUNC):
            symbols[found] = st_value
    return ElfInfo(symbols, is_go)


@dataclass(frozen=True, **SLOTS)
class SslTarget:
    """One OpenSSL copy to attach the uprobes to."""

    path: str  # the path to open (may go through /proc/<pid>/root)
    display: str  # the path as the process sees it
    dev: int
    ino: int
    symbols: dict[str, int] = field(hash=False, compare=False)
    embedded: bool = False  # an executable that exports SSL_* itself (Node.js)


def _usable(info: ElfInfo | None) -> bool:
    return info is not None and all(f in info.symbols for f in _REQUIRED)


class SslFinder:
    """Finds OpenSSL copies; each distinct file is returned once over the finder's life."""

    def __init__(
        self,
        proc: str = "/proc",
        lib_globs: tuple[str, ...] = LIB_GLOBS,
        bin_dirs: tuple[str, ...] = BIN_DIRS,
    ) -> None:
        self.proc = proc
        self.lib_globs = lib_globs
        self.bin_dirs = bin_dirs
        self._checked: dict[tuple[int, int, int], bool] = {}
        self._reported: set[tuple[int, int]] = set()

    def check(
        self, path: str, display: str | None = None, *, embedded: bool = False
    ) -> SslTarget | None:
        """The target at ``path`` if it is an OpenSSL copy not reported before."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if (st.st_dev, st.st_ino) in self._reported or self._checked.get(key) is False:
            return None
        info = elf_info(path)
        ok = _usable(info)
        self._checked[key] = ok
        if len(self._checked) > 100_000:
            self._checked.clear()
        if not ok or info is None:
            return None
        self._reported.add((st.st_dev, st.st_ino))
        return SslTarget(path, display or path, st.st_dev, st.st_ino, info.symbols, embedded)

    def scan_disk(self) -> list[SslTarget]:
        """libssl copies in the library folders, binaries with SSL_* in the bin folders."""
        out: list[SslTarget] = []
        for pattern in self.lib_globs:
            for path in sorted(glob.glob(pattern)):
                t = self.check(os.path.realpath(path))
                if t is not None:
                    out.append(t)
        for folder in self.bin_dirs:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                try:
                    if not entry.is_file() or entry.stat().st_size < 1 << 20:
                        continue  # an embedded OpenSSL alone is megabytes
                except OSError:
                    continue
                t = self.check(os.path.realpath(entry.path), embedded=True)
                if t is not None:
                    out.append(t)
        return out

    def scan_pid(self, pid: int) -> list[SslTarget]:
        """The executable of ``pid`` and the ``*ssl*`` libraries it maps."""
        out: list[SslTarget] = []
        base = f"{self.proc}/{pid}"
        try:
            exe = os.readlink(f"{base}/exe")
        except OSError:
            return out
        t = self.check(f"{base}/exe", exe, embedded=True)
        if t is not None:
            out.append(t)
        for lib in _mapped_ssl_libs(base):
            t = self.check(f"{base}/root{lib}", lib)
            if t is not None:
                out.append(t)
        return out

    def scan_processes(self) -> list[SslTarget]:
        out: list[SslTarget] = []
        me = os.getpid()
        for pid in _pids(self.proc):
            if pid != me:
                out += self.scan_pid(pid)
        return out


def _pids(proc: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(proc) if n.isdigit())
    except OSError:
        return []


def _mapped_files(base: str) -> set[str]:
    out: set[str] = set()
    try:
        with open(f"{base}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    except OSError:
        pass
    return out


def _mapped_ssl_libs(base: str) -> list[str]:
    return sorted(
        p for p in _mapped_files(base) if "ssl" in (n := os.path.basename(p)) or "libnode" in n
    )


# -- what cannot be observed ------------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class Unobservable:
    pid: int
    comm: str
    reason: str


def _grpc_boringssl(files: set[str]) -> bool:
    return any("cygrpc" in os.path.basename(p) for p in files)


def unobservable_processes(proc: str = "/proc") -> list[Unobservable]:
    """Processes with established TCP connections whose TLS, if any, the capture cannot see.

    A process counts when it maps no OpenSSL with exported SSL_read/SSL_write (neither a
    libssl nor its own executable), or when it is recognised as using a TLS stack the
    capture cannot probe whatever else it maps: grpcio's BoringSSL (``cygrpc``), a Go
    binary (crypto/tls).
    """
    from hopwatch.procfs import ProcFS, TcpState

    procfs = ProcFS(proc)
    infos: dict[tuple[int, int, int], ElfInfo | None] = {}
    out: list[Unobservable] = []
    me = os.getpid()
    for pid in _pids(proc):
        if pid == me:
            continue
        try:
            socks = procfs.tcp_fds(pid)
        except OSError:
            continue
        if not any(s.socket.state is TcpState.ESTABLISHED for s in socks):
            continue
        base = f"{proc}/{pid}"
        files = _mapped_files(base)
        if not files:
            continue  # a kernel thread, or gone
        candidates = [f"{base}/exe"] + [f"{base}/root{p}" for p in _mapped_ssl_libs(base)]
        observable = False
        is_go = False
        for path in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino, st.st_mtime_ns)
            if key not in infos:
                infos[key] = elf_info(path)
            info = infos[key]
            observable = observable or _usable(info)
            if path.endswith("/exe") and info is not None and info.is_go:
                is_go = True
        if _grpc_boringssl(files):  # even with libssl mapped: gRPC's TLS is BoringSSL's
            reason = "grpcio: BoringSSL linked without symbols"
        elif is_go:
            reason = "Go binary: crypto/tls has no OpenSSL functions to probe"
        elif observable:
            continue
        else:
            reason = "no OpenSSL (libssl or exported SSL_*) mapped"
        info_ = procfs.process(pid)
        out.append(Unobservable(pid, info_.comm if info_ is not None else "?", reason))
    return out

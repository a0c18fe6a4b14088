"""Which network sockets a set of processes listens on, read from /proc (Linux): for tests that check a
process tree exposes nothing beyond loopback."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process is gone
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_sockets(pids: list[int], *, udp: bool = False) -> list[tuple[str, str, int]]:
    """``(protocol, address, port)`` of the TCP sockets in LISTEN state (and, with ``udp``, the unconnected
    UDP sockets, which receive from anyone) that the processes ``pids`` hold."""
    inodes = _socket_inodes(pids)
    tables = [("tcp", _TCP_LISTEN)] + ([("udp", _UDP_UNCONNECTED)] if udp else [])
    found = []
    for protocol, state in tables:
        for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, line_state, inode = fields[1], fields[3], fields[9]
                if line_state != state or inode not in inodes:
                    continue
                hex_addr, hex_port = local.split(":")
                # /proc/net/* print each 32-bit word of the address in host (little-endian) order
                raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, len(hex_addr), 8))
                found.append((protocol, str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def beyond_loopback(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The sockets of ``listening_sockets`` that are not bound to a loopback address (``0.0.0.0``, ``::``,
    or an interface's address)."""
    return [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]


def process_tree(root: int) -> list[int]:
    """Pids of ``root`` and all its descendants (by parent pid, so also those that started sessions of
    their own, as the launcher's ranks do)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state ppid ...
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree

"""What a libvirt domain needs to attach a clone, in the form the installed libvirt takes.

Two forms (docs/operations.md has the matrix):

- `<disk type='network'>`, libvirt's own NBD disk. libvirt releases after 9.0 (2023) take `<reconnect
  delay='N'/>` in its `<source>`; Debian 12's 9.0 refuses the element (`define --validate`) or drops it. Without
  it QEMU gives up at the first dropped connection, so a reload or a worker's crash reaches the guest as an
  I/O error; a supervisor's crash does not drop connections (adopt.py) and stays unseen either way.
- `<qemu:commandline>` passing QEMU a `-blockdev` with `reconnect-delay` and its `-device`: reconnect on any
  libvirt, for a disk libvirt does not manage (no hotplug, block jobs or migration of it; the domain is
  marked tainted).

Which libvirt is installed is read from its domain schema: the form follows what it validates, not a version
table.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

from nbdclone import errors
from nbdclone.runtime import Address

SCHEMA = Path("/usr/share/libvirt/schemas/storagecommon.rng")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def takes_reconnect_delay() -> bool | None:
    """Whether the installed libvirt takes `<reconnect delay='N'/>` in an NBD disk's source; None when no
    libvirt is installed here."""
    try:
        text = SCHEMA.read_text()
    except FileNotFoundError:
        return None
    found = re.search(r'<define name="reconnect">(.*?)</define>', text, re.S)
    return bool(found and 'name="delay"' in found.group(1))


def disk_element(address: Address, slot: int, name: str, *, target: str, reconnect_delay: int | None) -> str:
    """libvirt's `<disk>` for clone `name` on `slot`; `<reconnect>` only when `reconnect_delay` is set."""
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", discard="unmap")
    source = ET.SubElement(disk, "source", protocol="nbd", name=name)
    if address.tls:
        source.set("tls", "yes")
    where = address.endpoint(slot)
    if isinstance(where, Path):
        ET.SubElement(source, "host", transport="unix", socket=str(where))
    else:
        ET.SubElement(source, "host", name=where[0], port=str(where[1]))
    if reconnect_delay is not None:
        ET.SubElement(source, "reconnect", delay=str(reconnect_delay))
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    return _text(disk)


def commandline_element(address: Address, slot: int, name: str, *, target: str, reconnect_delay: int) -> str:
    """A `<qemu:commandline>` giving QEMU clone `name` as a virtio disk with `reconnect-delay`, for a domain
    whose root element declares xmlns:qemu (QEMU_NS)."""
    if address.tls:
        raise errors.InvalidArgument(
            detail="--qemu-commandline does not carry TLS credentials; use the <disk> form (libvirt's nbd_tls)"
        )
    where = address.endpoint(slot)
    if isinstance(where, Path):
        server = {"type": "unix", "path": str(where)}
    else:
        server = {"type": "inet", "host": where[0], "port": str(where[1])}
    node = f"nbdclone-{target}"
    blockdev = {
        "driver": "nbd",
        "node-name": node,
        "server": server,
        "export": name,
        "reconnect-delay": reconnect_delay,
        "discard": "unmap",
    }
    device = {"driver": "virtio-blk-pci", "drive": node, "id": f"{node}-disk"}
    args = (
        "-blockdev",
        json.dumps(blockdev, separators=(",", ":")),
        "-device",
        json.dumps(device, separators=(",", ":")),
    )
    lines = [f"  <qemu:arg value={quoteattr(arg)}/>" for arg in args]  # quoteattr: '{"json"}' stays readable
    return "\n".join([f"<qemu:commandline xmlns:qemu={quoteattr(QEMU_NS)}>", *lines, "</qemu:commandline>"])


def _text(element: ET.Element) -> str:
    ET.indent(element, "  ")
    return ET.tostring(element, encoding="unicode")

"""OpenSeadragon, the report viewer's JavaScript, fetched once from the npm registry and vendored.

The report must open from ``file://`` on a machine without internet, so the viewer page never
points at a CDN: its script is copied beside the page. It comes from the npm registry at install
time (``make install`` runs ``python -m wsi_asmil.report.vendor``), pinned to one version and checked
against the registry's sha512 integrity hash, and is kept in :func:`vendor_dir` (inside the package,
or ``$WSI_ASMIL_VENDOR_DIR``). Building a report never downloads: a missing copy is a clear error
that says which command fetches it.

Kept from the package tarball: the minified script, its button images and its licence (BSD-3).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import logging
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.io import atomic_path

log = logging.getLogger(__name__)

OSD_VERSION = "6.1.1"
OSD_TARBALL = f"https://registry.npmjs.org/openseadragon/-/openseadragon-{OSD_VERSION}.tgz"
#: ``dist.integrity`` of openseadragon@6.1.1 in the npm registry's metadata.
OSD_INTEGRITY = "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw=="
#: The files the viewer needs, relative to the copy (the script names its images folder itself).
SCRIPT = "openseadragon.min.js"
LICENSE = "LICENSE.txt"


class VendorError(RuntimeError):
    """OpenSeadragon is missing or does not match its pinned hash; the message says what to run."""


def vendor_dir() -> Path:
    """Where the pinned OpenSeadragon is kept: ``$WSI_ASMIL_VENDOR_DIR`` or the package's ``_vendor``."""
    root = os.environ.get("WSI_ASMIL_VENDOR_DIR")
    base = Path(root) if root else Path(__file__).resolve().parent / "_vendor"
    return base / f"openseadragon-{OSD_VERSION}"


def check_integrity(data: bytes, integrity: str = OSD_INTEGRITY) -> None:
    """Raise :class:`VendorError` unless ``data`` has the npm ``integrity`` (``sha512-<base64>``)."""
    algo, _, expected = integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algo, data).digest()).decode("ascii")
    if digest != expected:
        raise VendorError(f"openseadragon {OSD_VERSION} tarball: {algo} is {digest}, expected {expected} "
                          "(a corrupted or substituted download); nothing was installed")


def unpack(tarball: bytes, dest: Path) -> Path:
    """Extract the script, its images and the licence from the npm tarball into ``dest`` (atomically)."""
    prefix = "package/build/openseadragon/"
    with atomic_path(dest) as tmp, tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        tmp.mkdir(parents=True)
        for member in tar.getmembers():
            if not member.isfile():
                continue
            if member.name == f"package/{LICENSE}":
                rel = LICENSE
            elif member.name == prefix + SCRIPT or (member.name.startswith(prefix + "images/") and member.name.endswith(".png")):
                rel = member.name[len(prefix):]
            else:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
        missing = [f for f in (SCRIPT, LICENSE) if not (tmp / f).is_file()]
        if missing:
            raise VendorError(f"openseadragon {OSD_VERSION} tarball lacks {missing}")
    return dest


def fetch(dest: Path | None = None, url: str = OSD_TARBALL) -> Path:
    """Download the pinned tarball from the npm registry, verify it and unpack it; returns the copy."""
    dest = dest or vendor_dir()
    log.info("fetching %s", url)
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    check_integrity(data)
    return unpack(data, dest)


def ensure(dest: Path | None = None) -> Path:
    """The vendored copy, fetched if absent (for ``make install``; report jobs use :func:`installed`)."""
    dest = dest or vendor_dir()
    return dest if (dest / SCRIPT).is_file() else fetch(dest)


def installed() -> Path:
    """The vendored copy, or :class:`VendorError` saying how to get it (never downloads)."""
    dest = vendor_dir()
    if not (dest / SCRIPT).is_file() or not (dest / LICENSE).is_file():
        raise VendorError(
            f"OpenSeadragon {OSD_VERSION} is not installed at {dest}: the report's viewer needs it. Run "
            "`make install` or `python -m wsi_asmil.report.vendor` once on a machine that reaches registry.npmjs.org "
            "(or set WSI_ASMIL_VENDOR_DIR to a folder that holds openseadragon-"
            f"{OSD_VERSION}/), or set viewer.enabled: false")
    return dest


def copy_into(target: str | os.PathLike[str]) -> Path:
    """Copy the vendored OpenSeadragon (script, images, licence) to ``target``, atomically."""
    source = installed()
    with atomic_path(target) as tmp:
        shutil.copytree(source, tmp)
    return Path(target)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.report.vendor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="download again even if a copy exists")
    args = p.parse_args(argv)
    setup_logging()
    path = fetch() if args.force else ensure()
    log.info("OpenSeadragon %s in %s", OSD_VERSION, path)


if __name__ == "__main__":
    main()

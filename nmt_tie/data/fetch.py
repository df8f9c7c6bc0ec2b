"""`nmt-tie data fetch`: download, verify and unpack the public corpora of data/corpora.yaml.

For users with internet access; tests run it only against a local mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

from nmt_tie.errors import UserError
from nmt_tie.progress import progress_bar

MANIFEST = Path(__file__).with_name("corpora.yaml")


def load_manifest(path: Path | None = None) -> dict:
    path = path or Path(os.environ.get("NMT_TIE_MANIFEST", MANIFEST))
    if not path.is_file():
        raise UserError(f"corpus manifest not found: {path}")
    return yaml.safe_load(path.read_text())


def mirrored(url: str, mirror: str | None) -> str:
    """`https://host/path` -> `MIRROR/host/path`, for a local copy of the public files."""
    if not mirror:
        return url
    parsed = urlparse(url)
    return f"{mirror.rstrip('/')}/{parsed.netloc}{parsed.path}"


def download(url: str, target: Path, sha256: str | None, log=print, md5: str | None = None) -> None:
    """Download to `target` (via a .part file), checking the sha256 (or md5) when given."""
    partial = target.with_name(target.name + ".part")
    expected, algorithm = (sha256, "sha256") if sha256 or not md5 else (md5, "md5")
    digest = hashlib.new(algorithm)
    request = urllib.request.Request(url, headers={"User-Agent": "nmt-tie"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(target.name, total=total, unit="B") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"download failed: {url}: {err}") from None
    actual = digest.hexdigest()
    if expected and actual != expected:
        partial.unlink(missing_ok=True)
        raise UserError(f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}")
    if not expected:
        log(f"{target.name}: no published checksum; sha256 of the download is {actual}")
    os.replace(partial, target)


def unpack(archive: Path, kind: str, into: Path) -> None:
    tmp = into.with_name(into.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mode = {"tgz": "r:gz", "tar": "r:"}[kind]
    try:
        with tarfile.open(archive, mode) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{archive}: cannot unpack ({err}); delete it and fetch again") from None
    os.replace(tmp, into)


def _find(name: str, roots: list[Path]) -> Path:
    for root in roots:
        if root.is_file() and (root.name == name or root.name.endswith("_" + name)):
            return root
        if root.is_dir():
            hits = sorted(root.rglob(name))
            if hits:
                return hits[0]
    raise UserError(f"{name} is not in the downloaded files; the manifest or the mirror is wrong")


def _concatenate(parts: list[Path], target: Path) -> int:
    """Write the parts one after another as plain text; return the number of lines."""
    tmp = target.with_name(target.name + ".part")
    lines = 0
    with open(tmp, "wb") as out:
        for part in parts:
            opener = gzip.open if part.suffix == ".gz" else open
            with opener(part, "rb") as src:
                for line in src:
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                    lines += 1
    os.replace(tmp, target)
    return lines


def _download_and_unpack(item: dict, downloads: Path, mirror: str | None, log) -> Path:
    """One manifest download; returns the file, or the directory it was unpacked into."""
    url = mirrored(item["url"], mirror)
    parsed = urlparse(item["url"])
    # host and path in the name: wmt13/test.tgz and wmt15/test.tgz must not collide
    archive = downloads / (parsed.netloc + parsed.path).replace("/", "_")
    if not archive.exists():
        log(f"downloading {url}")
        download(url, archive, item.get("sha256"), log, md5=item.get("md5"))
    kind = item.get("unpack", "none")
    if kind == "none":
        return archive
    unpacked = downloads / (archive.name + ".d")
    if not unpacked.exists():
        unpack(archive, kind, unpacked)
    return unpacked


def fetch(name: str, dest: Path, mirror: str | None = None, manifest: Path | None = None, log=print) -> Path:
    """Fetch corpus NAME into DEST/NAME and return that directory."""
    corpora = load_manifest(manifest)
    if name not in corpora:
        raise UserError(f"unknown corpus {name!r}; known: {', '.join(sorted(corpora))}")
    entry = corpora[name]
    out = Path(dest) / name
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    roots = [_download_and_unpack(item, downloads, mirror, log) for item in entry.get("downloads", [])]
    for split, by_lang in entry.get("splits", {}).items():
        for lang, names in by_lang.items():
            n = _concatenate([_find(n, roots) for n in names], out / f"{split}.{lang}")
            log(f"{out / f'{split}.{lang}'}: {n} lines")
    for split, spec in entry.get("test_sets", {}).items():
        _fetch_test_set(split, spec, entry["langs"], out, mirror, log)
    return out


def _fetch_test_set(split: str, spec: dict, langs: list[str], out: Path, mirror: str | None, log) -> None:
    """A WMT test set as sacrebleu knows it: its official archive (checked against sacrebleu's
    md5 sums), unpacked, and its SGML turned into plain text by sacrebleu's own converter."""
    from sacrebleu.dataset import DATASETS

    src, tgt = langs
    dataset = DATASETS[spec["sacrebleu"]]
    pair = f"{src}-{tgt}"
    if pair not in dataset.langpairs:
        raise UserError(f"sacrebleu test set {spec['sacrebleu']} has no {pair}")
    md5s = spec.get("md5") or dataset.md5 or [None] * len(dataset.data)
    roots = [
        _download_and_unpack({"url": url, "md5": md5, "unpack": "tgz"}, out / "downloads", mirror, log)
        for url, md5 in zip(dataset.data, md5s, strict=True)
    ]
    for lang, member in zip((src, tgt), dataset.langpairs[pair][:2], strict=True):
        source = _find(Path(member).name, roots)
        target = out / f"{split}.{lang}"
        dataset._convert_format(str(source), str(target))  # sacrebleu's SGML-to-text step
        log(f"{target}: sacrebleu {spec['sacrebleu']} {pair}")

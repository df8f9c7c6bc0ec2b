"""`nmt-tie data fetch` against a local mirror (a test HTTP server): no test uses the internet."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

from nmt_tie.data.fetch import fetch, load_manifest, mirrored
from nmt_tie.errors import UserError


@pytest.fixture()
def mirror(tmp_path):
    root = tmp_path / "mirror"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def add_tgz(path: Path, members: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fetch_downloads_verifies_unpacks_and_concatenates(tmp_path, mirror):
    root, url = mirror
    add_tgz(
        root / "www.statmt.org/wmt13/europarl.tgz",
        {"training/europarl.de-en.en": "a\nb\n", "training/europarl.de-en.de": "A\nB\n"},
    )
    gz = root / "example.org/cc.en.gz"
    gz.parent.mkdir(parents=True)
    gz.write_bytes(gzip.compress(b"c\n"))
    (root / "example.org/cc.de").write_text("C")  # no final newline: still one line
    manifest = {
        "toy": {
            "langs": ["en", "de"],
            "downloads": [
                {
                    "url": "https://www.statmt.org/wmt13/europarl.tgz",
                    "sha256": None,
                    "unpack": "tgz",
                },
                {
                    "url": "https://example.org/cc.en.gz",
                    "sha256": hashlib.sha256(gz.read_bytes()).hexdigest(),
                },
                {"url": "https://example.org/cc.de", "sha256": None},
            ],
            "splits": {
                "train": {
                    "en": ["europarl.de-en.en", "cc.en.gz"],
                    "de": ["europarl.de-en.de", "cc.de"],
                }
            },
        }
    }
    manifest_path = tmp_path / "corpora.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest))
    messages = []
    out = fetch("toy", tmp_path / "dest", mirror=url, manifest=manifest_path, log=messages.append)
    assert (out / "train.en").read_text() == "a\nb\nc\n"
    assert (out / "train.de").read_text() == "A\nB\nC\n"
    assert any("no published checksum" in m for m in messages)


def test_checksum_mismatch_is_an_error_and_keeps_nothing(tmp_path, mirror):
    root, url = mirror
    (root / "example.org").mkdir(parents=True)
    (root / "example.org/x.en").write_text("x\n")
    manifest = {
        "bad": {
            "langs": ["en", "de"],
            "downloads": [{"url": "https://example.org/x.en", "sha256": "0" * 64}],
        }
    }
    path = tmp_path / "corpora.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(UserError, match="checksum mismatch"):
        fetch("bad", tmp_path / "dest", mirror=url, manifest=path, log=lambda m: None)
    assert not list((tmp_path / "dest/bad/downloads").iterdir())


def test_unknown_corpus_and_unreachable_server(tmp_path):
    with pytest.raises(UserError, match="unknown corpus"):
        fetch("nope", tmp_path)
    with pytest.raises(UserError, match="download failed"):
        fetch("multi30k_en_de", tmp_path, mirror="http://127.0.0.1:9", log=lambda m: None)


def test_the_shipped_manifest_lists_the_recipes_corpora():
    corpora = load_manifest()
    for name in ("multi30k_en_de", "multi30k_en_fr", "wmt14_en_fr", "wmt15_en_de", "wmt14_en_de"):
        entry = corpora[name]
        assert len(entry["langs"]) == 2 and entry["downloads"]
        for split in entry["splits"].values():
            assert set(split) == set(entry["langs"])
    assert mirrored("https://a.org/x/y.tgz", "http://m:1/") == "http://m:1/a.org/x/y.tgz"

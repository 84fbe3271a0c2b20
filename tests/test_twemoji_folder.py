"""scripts/twemoji_folder.py: Twemoji's npm tarball -> a captioned folder, one emoji per family."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import twemoji_folder  # noqa: E402

SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><circle cx="18" cy="18" r="16" fill="{}"/></svg>'


def _tarball(path: Path, svgs: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**{f"package/dist/svg/{k}.svg": v for k, v in svgs.items()},
                           "package/README.md": "twemoji"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_keeps_the_plainest_member_of_each_family_with_its_name(tmp_path):
    package = _tarball(tmp_path / "tw.tgz", {
        "1f44d": SVG.format("#fc0"),            # thumbs up
        "1f44d-1f3fb": SVG.format("#fdb"),      # thumbs up, light skin tone: same family, dropped
        "1f600": SVG.format("#ff0"),            # grinning face
        "e000": SVG.format("#000"),             # private use: no name, dropped
    })
    assert twemoji_folder.main(["--package", str(package), "--out", str(tmp_path / "out"), "--size", "24"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "images/1f44d.png", "text": "thumbs up"},
                    {"file_name": "images/1f600.png", "text": "grinning face"}]
    with Image.open(tmp_path / "out" / "images" / "1f44d.png") as image:
        assert image.size == (24, 24) and image.getpixel((12, 12))[:3] == (255, 204, 0)


def test_a_tarball_without_svgs_is_named(tmp_path):
    with pytest.raises(ValueError, match="no dist/svg"):
        twemoji_folder.main(["--package", str(_tarball(tmp_path / "x.tgz", {})), "--out", str(tmp_path / "o")])

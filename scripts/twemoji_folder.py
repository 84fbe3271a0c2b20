"""Turn Twemoji's SVGs into a captioned image folder: the testbed's second source (issue 3).

The testbed recipe was tuned on OpenMoji. To check that it memorizes on images it was not tuned
on, this writes Twitter's emoji set (a different drawing style, CC BY 4.0) as a plain folder that
``python -m data.testbed --source folder:PATH`` reads like any user's data: ``metadata.jsonl`` with
``file_name`` and ``text`` (the emoji's English name), one PNG per emoji.

    npm pack @discordapp/twemoji          # the package registry is reachable; no hub needed
    python scripts/twemoji_folder.py --package discordapp-twemoji-*.tgz --out data/twemoji

Skin-tone and gender variants are near-copies of one another; only the plainest member of each
family is kept (the same rule the OpenMoji source uses), so a planted image has no twin.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

from data.testbed.sources import openmoji_family, openmoji_name


def svgs_in(package: Path) -> dict[str, bytes]:
    """{upper-case code: svg bytes} from the npm tarball or an unpacked ``svg`` folder."""
    if package.is_dir():
        return {p.stem.upper(): p.read_bytes() for p in sorted(package.glob("*.svg"))}
    out = {}
    with tarfile.open(package) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".svg") and "/svg/" in member.name:
                out[Path(member.name).stem.upper()] = tar.extractfile(member).read()
    if not out:
        raise ValueError(f"{package}: no dist/svg/*.svg inside; is it the @discordapp/twemoji package?")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", required=True, type=Path, help="the npm tarball, or a folder of Twemoji SVGs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=72, help="PNG side in pixels (the testbed resizes again)")
    a = p.parse_args(argv)
    import resvg_py

    plainest: dict[str, tuple[str, str]] = {}  # family -> (code, name)
    svgs = svgs_in(a.package)
    for code in sorted(svgs):
        name = openmoji_name(code)
        if name is None:
            continue
        family = openmoji_family(code)
        best = plainest.get(family)
        if best is None or (code.count("-"), code) < (best[0].count("-"), best[0]):
            plainest[family] = (code, name)
    (a.out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for code, name in sorted(plainest.values()):
        png = resvg_py.svg_to_bytes(svg_string=svgs[code].decode("utf-8"), width=a.size, height=a.size)
        file_name = f"images/{code.lower()}.png"
        Image.open(io.BytesIO(bytes(png))).convert("RGBA").save(a.out / file_name)
        rows.append({"file_name": file_name, "text": name})
    (a.out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (a.out / "README.md").write_text(
        "Twemoji (c) Twitter, Inc. and other contributors, graphics licensed CC BY 4.0\n"
        "(https://creativecommons.org/licenses/by/4.0/). Rendered by scripts/twemoji_folder.py.\n", encoding="utf-8")
    print(f"{len(rows)} emoji of {len(svgs)} SVGs -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

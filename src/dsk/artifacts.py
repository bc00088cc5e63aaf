"""The versioned artifact store: content-addressed stage outputs with manifests, atomic writes.

Layout of a workspace (``./.dsk`` or ``$DSK_HOME``)::

    .dsk/
      artifacts/<stage>/<id>/manifest.json   # + the stage's payload files and log.txt
      tmp/                                   # staging dirs, renamed into artifacts/ when complete
      refs.json                              # tags and the latest artifact of each stage

An artifact id is a short hash of (stage, input ids, canonical params, seed, code version), so
the same inputs and params give the same id and a rerun is a cache hit. See docs/artifacts.md.

    $ dsk ls clean
    $ dsk verify
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dsk.errors import DskError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
ID_LENGTH = 12
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """Deterministic JSON used for hashing: sorted keys, no whitespace, no NaN surprises."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def compute_id(
    *, stage: str, input_keys: list[str], params: dict[str, Any], seed: int, code_version: str
) -> str:
    payload = canonical_json(
        {
            "stage": stage,
            "inputs": input_keys,
            "params": params,
            "seed": seed,
            "code": code_version,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:ID_LENGTH]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RawInput:
    """A user file or directory, identified by the hash of its content (not its path or mtime)."""

    path: Path
    sha256: str
    files: tuple[Path, ...]
    n_bytes: int

    @property
    def key(self) -> str:
        return f"raw:{self.sha256}"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "type": "raw",
            "path": str(self.path),
            "sha256": self.sha256,
            "files": len(self.files),
            "bytes": self.n_bytes,
        }


def hash_raw_input(path: str | Path) -> RawInput:
    """Hash a raw file or directory by content; relative names count, so a rename is a change."""
    p = Path(path)
    if not p.exists():
        raise DskError(f"input path {str(path)!r} does not exist; check the path")
    if p.is_file():
        files = [p]
        names = [p.name]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DskError(f"input directory {str(path)!r} is empty; put data files in it")
        names = [str(f.relative_to(p)) for f in files]
    h = hashlib.sha256()
    total = 0
    for name, f in zip(names, files):
        try:
            digest = sha256_file(f)
        except OSError as exc:
            raise DskError(f"cannot read input file {str(f)!r}: {exc.strerror}") from None
        total += f.stat().st_size
        h.update(f"{name}\0{digest}\n".encode())
    return RawInput(path=p, sha256=h.hexdigest(), files=tuple(files), n_bytes=total)


# --------------------------------------------------------------------------- artifacts


@dataclass
class Artifact:
    """A completed artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "")

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.id}"

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def input_ids(self) -> list[str]:
        return [i["id"] for i in self.manifest.get("inputs", []) if i.get("type") == "artifact"]

    def file(self, name: str) -> Path:
        return self.path / name

    def to_manifest_ref(self) -> dict[str, Any]:
        return {"type": "artifact", "id": self.id, "stage": self.stage, "kind": self.kind}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DskError(f"no manifest.json in {str(directory)!r}; it is not a dsk artifact") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DskError(
            f"corrupt manifest {str(path)!r} ({exc.__class__.__name__}); "
            "delete that artifact directory and rerun its stage"
        ) from None
    if not isinstance(data, dict) or not {"id", "stage", "files"} <= data.keys():
        raise DskError(
            f"corrupt manifest {str(path)!r} (missing id/stage/files); "
            "delete that artifact directory and rerun its stage"
        )
    return data


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def file_entries(directory: Path) -> list[dict[str, Any]]:
    entries = []
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            entries.append(
                {"path": str(f.relative_to(directory)), "sha256": sha256_file(f), "size": f.stat().st_size}
            )
    return entries


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the store


class Store:
    """A workspace of artifacts. Open one with ``Store.open()``."""

    def __init__(self, root: Path):
        self.root = root
        self.artifacts_dir = root / "artifacts"
        self.tmp_dir = root / "tmp"
        self.refs_path = root / "refs.json"

    # ---- opening

    @classmethod
    def open(cls, root: str | Path | None = None) -> "Store":
        if root is None:
            root = os.environ.get("DSK_HOME") or (Path.cwd() / ".dsk")
        return cls(Path(root).expanduser().absolute())

    def ensure_writable(self) -> None:
        try:
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise DskError(
                f"workspace {str(self.root)!r} is not writable ({exc.strerror}); "
                "fix its permissions or set DSK_HOME to a writable directory"
            ) from None

    # ---- refs (tags and latest per stage), written atomically

    def _read_refs(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.refs_path.read_text())
        except FileNotFoundError:
            return {"tags": {}, "latest": {}}
        except json.JSONDecodeError:
            raise DskError(
                f"corrupt {str(self.refs_path)!r}; delete it (tags and latest pointers are lost, "
                "artifacts are kept)"
            ) from None
        data.setdefault("tags", {})
        data.setdefault("latest", {})
        return data

    def _write_refs(self, refs: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.refs_path.with_name(f".refs-{uuid.uuid4().hex}.json")
        tmp.write_text(json.dumps(refs, indent=2, sort_keys=True))
        os.replace(tmp, self.refs_path)

    def tags(self) -> dict[str, str]:
        return dict(self._read_refs()["tags"])

    def tag(self, ref: str, name: str) -> Artifact:
        if not name or "/" in name or name.startswith("."):
            raise DskError(f"invalid tag name {name!r}; use letters, digits, '-', '_' or '.'")
        art = self.resolve(ref)
        refs = self._read_refs()
        refs["tags"][name] = art.id
        self._write_refs(refs)
        return art

    def untag(self, name: str) -> None:
        refs = self._read_refs()
        if name not in refs["tags"]:
            raise DskError(f"no tag named {name!r}; list tags with `dsk ls --tags`")
        del refs["tags"][name]
        self._write_refs(refs)

    def set_latest(self, artifact: Artifact) -> None:
        refs = self._read_refs()
        if refs["latest"].get(artifact.stage) != artifact.id:
            refs["latest"][artifact.stage] = artifact.id
            self._write_refs(refs)

    # ---- lookup

    def artifact_dir(self, stage: str, artifact_id: str) -> Path:
        return self.artifacts_dir / stage / artifact_id

    def iter_dirs(self, stage: str | None = None) -> Iterator[Path]:
        if not self.artifacts_dir.is_dir():
            return
        stages = [self.artifacts_dir / stage] if stage else sorted(self.artifacts_dir.iterdir())
        for sdir in stages:
            if sdir.is_dir():
                yield from sorted(d for d in sdir.iterdir() if d.is_dir())

    def iter_artifacts(self, stage: str | None = None, *, skip_corrupt: bool = True) -> Iterator[Artifact]:
        for d in self.iter_dirs(stage):
            try:
                yield Artifact(d, read_manifest(d))
            except DskError:
                if not skip_corrupt:
                    raise

    def find_by_id(self, artifact_id: str) -> Artifact | None:
        for d in self.iter_dirs():
            if d.name == artifact_id:
                return Artifact(d, read_manifest(d))
        return None

    def resolve(self, ref: str) -> Artifact:
        """An artifact by id, unique id prefix, tag, ``stage:latest``, or directory path."""
        ref = str(ref).strip()
        if not ref:
            raise DskError("empty artifact reference; give an id, a tag or a path")
        refs = self._read_refs()
        if ref in refs["tags"]:
            art = self.find_by_id(refs["tags"][ref])
            if art is None:
                raise DskError(f"tag {ref!r} points to a removed artifact; retag with `dsk tag`")
            return art
        if ref.endswith(":latest") or ref in refs["latest"]:
            stage = ref.removesuffix(":latest")
            art = self.latest(stage)
            if art is None:
                raise DskError(f"no {stage} artifact yet; run `dsk {stage}` first")
            return art
        p = Path(ref)
        if (p / MANIFEST).exists():
            return Artifact(p.absolute(), read_manifest(p))
        matches = [d for d in self.iter_dirs() if d.name.startswith(ref)] if len(ref) >= 4 else []
        if len(matches) == 1:
            return Artifact(matches[0], read_manifest(matches[0]))
        if len(matches) > 1:
            raise DskError(f"artifact prefix {ref!r} is ambiguous ({len(matches)} matches); give more characters")
        raise DskError(f"no artifact matches {ref!r}; list them with `dsk ls`")

    def latest(self, stage: str) -> Artifact | None:
        """The artifact this stage produced most recently (a cache hit counts as producing it)."""
        refs = self._read_refs()
        aid = refs["latest"].get(stage)
        if aid:
            d = self.artifact_dir(stage, aid)
            if (d / MANIFEST).exists():
                return Artifact(d, read_manifest(d))
        newest = None
        for art in self.iter_artifacts(stage):
            if newest is None or art.manifest.get("finished_at", "") > newest.manifest.get("finished_at", ""):
                newest = art
        return newest

    def latest_of(self, stages: list[str]) -> Artifact | None:
        """The most recently finished artifact among the latest of each of ``stages``."""
        candidates = [a for a in (self.latest(s) for s in stages) if a is not None]
        if not candidates:
            return None
        return max(candidates, key=lambda a: a.manifest.get("finished_at", ""))

    # ---- integrity

    def verify(self, artifact: Artifact) -> list[str]:
        """Recompute every file's hash and size; return a list of problems (empty when intact)."""
        problems = []
        listed = set()
        for entry in artifact.manifest.get("files", []):
            f = artifact.path / entry["path"]
            listed.add(entry["path"])
            if not f.is_file():
                problems.append(f"{entry['path']}: missing")
                continue
            if f.stat().st_size != entry["size"]:
                problems.append(f"{entry['path']}: size {f.stat().st_size} != {entry['size']}")
            elif sha256_file(f) != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 mismatch")
        for f in artifact.path.rglob("*"):
            rel = str(f.relative_to(artifact.path))
            if f.is_file() and f.name != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not in manifest")
        return problems

    # ---- lineage and garbage collection

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """A nested dict: this artifact and, recursively, what it was made from."""
        node: dict[str, Any] = {"artifact": artifact, "inputs": []}
        for inp in artifact.manifest.get("inputs", []):
            if inp.get("type") == "artifact":
                parent = self.find_by_id(inp["id"])
                if parent is None:
                    node["inputs"].append({"missing": inp})
                else:
                    node["inputs"].append(self.lineage(parent))
            else:
                node["inputs"].append({"raw": inp})
        return node

    def nearest_ancestor(self, artifact: Artifact, kinds: set[str], *, include_self: bool = True) -> Artifact | None:
        """The closest artifact of one of ``kinds`` in ``artifact``'s lineage, breadth first."""
        queue, seen = [artifact], set()
        while queue:
            art = queue.pop(0)
            if art.id in seen:
                continue
            seen.add(art.id)
            if art.kind in kinds and (include_self or art is not artifact):
                return art
            queue.extend(p for p in (self.find_by_id(i) for i in art.input_ids) if p is not None)
        return None

    def ancestors(self, artifact: Artifact) -> set[str]:
        seen: set[str] = set()
        by_id = {a.id: a for a in self.iter_artifacts()}
        stack = [artifact.id]
        while stack:
            aid = stack.pop()
            if aid in seen:
                continue
            seen.add(aid)
            art = by_id.get(aid)
            if art is not None:
                stack.extend(art.input_ids)
        return seen

    def gc(self, *, dry_run: bool = False) -> list[Artifact]:
        """Remove artifacts that are neither tagged, the latest of a stage, nor in their lineage."""
        refs = self._read_refs()
        roots = set(refs["tags"].values()) | set(refs["latest"].values())
        by_id = {a.id: a for a in self.iter_artifacts()}
        keep: set[str] = set()
        stack = [r for r in roots if r in by_id]
        while stack:
            aid = stack.pop()
            if aid in keep:
                continue
            keep.add(aid)
            stack.extend(by_id[aid].input_ids if aid in by_id else [])
        doomed = [a for aid, a in sorted(by_id.items()) if aid not in keep]
        if not dry_run:
            for art in doomed:
                shutil.rmtree(art.path, ignore_errors=True)
            self.cleanup_leftovers()
        return doomed

    # ---- atomic writes

    def cleanup_leftovers(self) -> int:
        """Remove staging dirs left by crashed runs (their writer process is gone)."""
        removed = 0
        if not self.tmp_dir.is_dir():
            return 0
        for d in self.tmp_dir.iterdir():
            pid_str = d.name.rsplit("-", 2)[-2] if d.name.count("-") >= 2 else ""
            if pid_str.isdigit() and _pid_alive(int(pid_str)):
                continue
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed += 1
        return removed

    @contextmanager
    def staging(self, stage: str, artifact_id: str) -> Iterator[Path]:
        """A temporary directory renamed to the artifact's final place only if the block succeeds."""
        self.ensure_writable()
        self.cleanup_leftovers()
        tmp = self.tmp_dir / f"{stage}-{artifact_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, tmp: Path, stage: str, artifact_id: str, *, replace: bool) -> Path:
        final = self.artifact_dir(stage, artifact_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            # --force: move the old one aside first so that the swap is two renames, never a half dir
            trash = self.tmp_dir / f"trash-{artifact_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
        return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest["files"] = file_entries(directory)
    manifest["size_bytes"] = sum(f["size"] for f in manifest["files"])
    path = directory / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def elapsed_since(start: float) -> float:
    return round(time.perf_counter() - start, 3)

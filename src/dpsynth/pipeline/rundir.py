"""The run directory: `manifest.yaml` (single source of truth), artifacts, and a lock.

Like a DVC stage lock: every stage records its resolved config, command line, versions,
start/end, status and the sha256 of what it read and wrote. Every file is written to a
temporary name in the same directory and renamed into place, so a crash leaves either
the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import os
import platform
import resource
import secrets
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import yaml

from .. import __version__
from ..errors import BadInput, IntegrityError, RunDirError, StorageError
from ..privacy.events import SCHEMA_VERSION as EVENT_SCHEMA_VERSION
from ..privacy.events import PrivacyEvent, event_from_dict
from .names import DEFAULT_RUN  # noqa: F401  (declared with the other run-directory names)
from .names import PRETRAIN, SELECT_PUBLIC, STAGES

if TYPE_CHECKING:  # readers of run directories (ledger, report) need not load the accountant
    from ..privacy.accountant import EpsilonBounds

MANIFEST = "manifest.yaml"
LOCK = ".lock"
MANIFEST_SCHEMA_VERSION = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write via temp file + fsync + rename; returns the sha256 of `data`.
    On any OS error (full disk, read-only) the old file stays and StorageError says why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {_os_reason(exc)}; {path.name} was left as it was "
                           f"(free space or choose a writable location)") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return hashlib.sha256(data).hexdigest()


def _os_reason(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({code})" if code else str(exc.strerror or exc)


def check_writable_location(path: Path) -> None:
    """Refuse an output directory that cannot be created or written, before any work is done.
    The probe is a nameless temp file in the nearest existing ancestor (removed at once)."""
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"run={path} cannot be created: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise StorageError(f"run={path} is not writable ({ancestor}: {_os_reason(exc)}); "
                           f"choose a writable directory") from None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version(), "dpsynth": __version__}
    for name in ("torch", "torchvision", "opacus", "prv-accountant", "clean-fid", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


class RunDir:
    """A run directory; construct with `RunDir.open` (must exist) or `RunDir.create`."""

    def __init__(self, path: Path, manifest: dict, loaded_sha256: str | None = None):
        self.path = Path(path)
        self.manifest = manifest
        # What was on disk when we read it: `lock` refuses if another process changed it since.
        self._loaded_sha256 = loaded_sha256

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunDirError(f"run directory {path} has no {MANIFEST}; run 'dpsynth select-public' or "
                              f"'dpsynth pretrain' on it first")
        raw = manifest_path.read_bytes()
        try:
            manifest = yaml.safe_load(raw.decode())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunDirError(f"manifest {manifest_path} is corrupt (not valid YAML: {first}); "
                              f"it was left untouched") from None
        validate_manifest(manifest, manifest_path)
        return cls(path, manifest, hashlib.sha256(raw).hexdigest())

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def create(cls, path: str | Path, *, method: str, sensitive: dict, public: dict | None,
               delta: float, settings: dict, assumptions: dict | None = None) -> "RunDir":
        """A new manifest in memory; nothing is written until `save` (inside `lock`)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise RunDirError(f"run directory {path} already has a manifest")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run={path} exists and is not a directory")
        check_writable_location(path)
        manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "dpsynth_version": __version__,
            "run_id": f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}",
            "created": now(),
            "method": method,
            "settings": settings,
            "sensitive": sensitive,
            "public": public,
            "privacy": {"delta": float(delta), "epsilon": 0.0, "accountant": "prv",
                        "event_schema_version": EVENT_SCHEMA_VERSION, "assumptions": assumptions or {},
                        "events": []},
            "stages": {},
            "artifacts": {},
            "results": {},
        }
        return cls(path, manifest)

    # ---- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunDir"]:
        """Exclusive lock: O_EXCL create of DIR/.lock holding our pid. Directories this call
        creates are removed again if the body fails before writing anything into them."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        lock_path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RunDirError(_lock_holder_message(lock_path)) from None
        except OSError as exc:
            _remove_empty(created)
            raise StorageError(f"cannot lock run directory {self.path}: {_os_reason(exc)}") from None
        try:
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            lock_path.unlink()
            _remove_empty(created)
            raise StorageError(f"cannot write lock {lock_path}: {_os_reason(exc)}") from None
        try:
            self._check_unchanged_since_read()
            _remove_dead_temp_files(self.path)
            yield self
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            _remove_empty(created)

    def _check_unchanged_since_read(self) -> None:
        manifest_path = self.path / MANIFEST
        on_disk = sha256_file(manifest_path) if manifest_path.is_file() else None
        if on_disk != self._loaded_sha256:
            raise RunDirError(f"run directory {self.path} was changed by another process while this command "
                              f"was preparing ({MANIFEST} {'appeared' if self._loaded_sha256 is None else 'changed'}); "
                              f"nothing was written, run the command again")

    # ---- manifest -------------------------------------------------------------------------
    def save(self) -> None:
        text = yaml.safe_dump(self.manifest, sort_keys=False, default_flow_style=None, width=110)
        self._loaded_sha256 = atomic_write_bytes(self.path / MANIFEST, text.encode())

    @property
    def delta(self) -> float:
        return float(self.manifest["privacy"]["delta"])

    def events(self) -> list[PrivacyEvent]:
        return [event_from_dict(record) for record in self.manifest["privacy"]["events"]]

    def record_event(self, event: PrivacyEvent, after: "EpsilonBounds", save: bool = True) -> None:
        """Write-ahead: the event is on disk before the mechanism's output exists.
        `after` is the composition of all events including this one. `save=False` is for a run
        still being created: its first save (before any mechanism runs) writes the event."""
        record = event.to_dict()
        if not record.get("note"):
            record.pop("note", None)
        record["time"] = now()
        record["epsilon_after"] = float(after.upper)
        record["accountant"] = after.accountant
        self.manifest["privacy"]["events"].append(record)
        self.manifest["privacy"]["epsilon"] = float(after.upper)
        self.manifest["privacy"]["accountant"] = after.accountant
        if save:
            self.save()

    # ---- stages -------------------------------------------------------------------------
    def begin_stage(self, stage: str, config: dict, inputs: list[str], started: str | None = None) -> None:
        """`started`: when the stage's work began, if before this call (work that needs no lock or
        event, e.g. select-public's query network and labelling); default now."""
        for name in inputs:
            self.verify_artifact(name)
        self.manifest["stages"][stage] = {
            "status": "running",
            "started": started or now(),
            "ended": None,
            "command": " ".join(sys.argv) if sys.argv else "",
            "config": config,
            "versions": package_versions(),
            "inputs": {name: self.manifest["artifacts"][name]["sha256"] for name in inputs},
            "outputs": {},
        }
        self.save()

    def end_stage(self, stage: str, status: str = "completed") -> None:
        self.manifest["stages"][stage]["status"] = status
        self.manifest["stages"][stage]["ended"] = now()
        # Peak resident memory of this process so far (Linux reports KiB): what a user sizes a machine by.
        self.manifest["stages"][stage]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        self.save()

    def stage_done(self, stage: str) -> bool:
        return self.manifest["stages"].get(stage, {}).get("status") == "completed"

    def require_stage(self, stage: str, needed_by: str) -> None:
        """Refuses unless `stage` completed, naming every stage still missing before `needed_by`
        (of those the run's method uses), in order: not only the nearest one."""
        if self.stage_done(stage):
            return
        before = STAGES[:STAGES.index(needed_by)]
        missing = [s for s in self._stages_used() if s in before and not self.stage_done(s)]
        missing = missing if stage in missing else [stage]
        raise RunDirError(f"stage '{needed_by}' needs {', '.join(repr(s) for s in missing)} to have completed in "
                          f"{self.path}; run " + ", then ".join(f"'dpsynth {s}'" for s in missing) + " on it first")

    def _stages_used(self) -> list[str]:
        from ..methods import get_method  # only on this error path: the methods import torch

        method = get_method(self.manifest["method"])
        skipped = {SELECT_PUBLIC: not method.uses_public_selection, PRETRAIN: not method.uses_pretrain_stage}
        return [s for s in STAGES if not skipped.get(s, False)]

    # ---- artifacts ----------------------------------------------------------------------
    def write_artifact(self, stage: str, name: str, data: bytes | Callable[[io.BytesIO], None]) -> Path:
        if callable(data):
            buffer = io.BytesIO()
            data(buffer)
            data = buffer.getvalue()
        digest = atomic_write_bytes(self.path / name, data)
        self.manifest["artifacts"][name] = {"sha256": digest, "bytes": len(data), "stage": stage}
        self.manifest["stages"][stage]["outputs"][name] = digest
        self.save()
        return self.path / name

    def artifact_path(self, name: str) -> Path:
        return self.path / name

    def has_artifact(self, name: str) -> bool:
        return name in self.manifest["artifacts"]

    def verify_artifact(self, name: str) -> Path:
        """Refuse an artifact that is missing or whose bytes changed since it was written."""
        entry = self.manifest["artifacts"].get(name)
        path = self.path / name
        if entry is None:
            raise RunDirError(f"artifact {name} is not recorded in {self.path / MANIFEST}")
        if not path.is_file():
            raise IntegrityError(f"artifact {path} is missing (written by stage '{entry['stage']}'); "
                                 f"rerun that stage")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise IntegrityError(f"artifact {path} changed since stage '{entry['stage']}' wrote it "
                                 f"(sha256 {actual[:12]}… != recorded {entry['sha256'][:12]}…); rerun that stage")
        return path

    def read_artifact(self, name: str) -> bytes:
        path = self.verify_artifact(name)
        return path.read_bytes()


def _remove_dead_temp_files(directory: Path) -> None:
    """Temp files of a writer killed mid-write (`.NAME.PID.HEX.tmp`, PID dead) are garbage:
    the rename never happened, so the real file is still the old one."""
    for tmp in directory.glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)
        if len(parts) == 4 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _remove_empty(created: list[Path]) -> None:
    for directory in created:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def _lock_holder_message(lock_path: Path) -> str:
    try:
        pid = int(lock_path.read_text().strip() or "0")
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _pid_alive(pid):
        return f"run directory {lock_path.parent} is in use by process {pid} (lock {lock_path}); wait for it to finish"
    return (f"run directory {lock_path.parent} has a stale lock from process {pid or '?'} that is no longer running; "
            f"if no dpsynth process uses it, remove {lock_path}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def validate_manifest(manifest: Any, where: Path) -> None:
    """Schema check on load; a manifest that fails is refused, never rewritten."""
    def bad(reason: str) -> RunDirError:
        return RunDirError(f"manifest {where} is invalid: {reason}; it was left untouched")

    if not isinstance(manifest, dict):
        raise bad("top level is not a mapping")
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise RunDirError(f"manifest {where} has schema_version {version!r}; this dpsynth "
                          f"{__version__} reads schema_version {MANIFEST_SCHEMA_VERSION} only")
    for key, kind in (("privacy", dict), ("stages", dict), ("artifacts", dict), ("sensitive", dict),
                      ("method", str)):
        if not isinstance(manifest.get(key), kind):
            raise bad(f"'{key}' is missing or not a {kind.__name__}")
    privacy = manifest["privacy"]
    if not isinstance(privacy.get("events"), list):
        raise bad("'privacy.events' is missing or not a list")
    delta = privacy.get("delta")
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise bad(f"'privacy.delta' = {delta!r} is not in (0, 1)")
    for record in privacy["events"]:
        try:
            event_from_dict(record)
        except BadInput as exc:
            raise bad(str(exc)) from None
    for name, entry in manifest["artifacts"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
            raise bad(f"artifact entry {name!r} has no sha256")

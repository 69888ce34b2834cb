"""The data owner's secret key: what makes every value derived from the sensitive set keyed.

A plain hash of the training pixels in a shared manifest is a membership oracle: whoever
holds all candidate images but one hashes both candidate datasets and learns which was
used. So every tag and every membership draw dpsynth derives from sensitive records is an
HMAC-SHA256 under this key, which is created on first use with mode 0600 in
`$DPSYNTH_HOME` (default `~/.config/dpsynth`), outside every run directory. Without the
key the tags are uniformly random strings; with it the owner can still check that a run
was made from exactly their data.

Torch-free on purpose: `dpsynth.privacy` must be importable without torch.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput

KEY_FILE = "owner.key"
_KEY_BYTES = 32


@dataclass(frozen=True)
class OwnerKey:
    secret: bytes = b""
    path: Path = Path()

    @property
    def key_id(self) -> str:
        """A public name for the key (a function of the key alone, never of the data)."""
        return hmac.new(self.secret, b"dpsynth owner key id", hashlib.sha256).hexdigest()[:16]

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over the length-prefixed parts (prefixes keep part boundaries unambiguous)."""
        h = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

    def __repr__(self) -> str:  # never print the secret
        return f"OwnerKey(path={str(self.path)!r}, key_id={self.key_id!r})"


def dpsynth_home() -> Path:
    """$DPSYNTH_HOME, else ~/.config/dpsynth."""
    home = os.environ.get("DPSYNTH_HOME")
    return Path(home).expanduser() if home else Path.home() / ".config" / "dpsynth"


def key_path() -> Path:
    return dpsynth_home() / KEY_FILE


def load_owner_key(create: bool = True) -> OwnerKey:
    """The owner's key, created (mode 0600) on first use when `create`; refuses a key file that
    others can read or that is malformed, rather than silently using or replacing it."""
    path = key_path()
    if not path.exists():
        if not create:
            raise BadInput(f"owner key {path} does not exist; set DPSYNTH_HOME to the directory that holds it")
        _create(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise BadInput(f"owner key {path} is not a regular file; move it away or set DPSYNTH_HOME elsewhere")
        if mode & 0o077:
            raise BadInput(f"owner key {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by its owner "
                           f"only (chmod 600 {path})")
        text = path.read_text().strip()
    except OSError as exc:
        raise BadInput(f"owner key {path} is unreadable ({exc.strerror or exc}); fix its permissions or set "
                       f"DPSYNTH_HOME to a directory you own") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != _KEY_BYTES:
        raise BadInput(f"owner key {path} is malformed (expected {2 * _KEY_BYTES} hex characters); restore it "
                       f"from a backup, or remove it to start a new key (old runs' tags then cannot be checked)")
    return OwnerKey(secret, path)


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: two processes creating the key at once cannot both win and disagree.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise BadInput(f"cannot create the owner key {path} ({exc.strerror or exc}); set DPSYNTH_HOME to a "
                       f"writable directory") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_outside(key: OwnerKey, directory: str | os.PathLike) -> None:
    """Refuse a run directory that would contain the key (it would be shared with the run)."""
    run = Path(directory).expanduser().absolute()
    where = key.path.absolute()
    if run == where.parent or run in where.parents:
        raise BadInput(f"run directory {directory} contains the owner key {where}; put runs elsewhere or set "
                       f"DPSYNTH_HOME outside it")

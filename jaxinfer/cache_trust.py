"""Trust in the compilation cache directory: what is loaded from it runs as code in this process.

jax's persistent cache holds compiled executables and jaxinfer's program store (executables.py) holds pickles, so
whoever can write into the directory can run code in every engine that uses it. Before either is used:

- The directory must belong to this user and be writable by nobody else (no group / other write bit); a missing
  one is created with mode 0700. Otherwise it is refused: a warning, and programs are compiled, not loaded.
- Every file written there is signed: an HMAC-SHA256 over its name and contents, with a key of 32 random bytes kept
  in the directory (`.jaxinfer-signing-key`, mode 0600, created on first use, refused if another user owns it or
  others can read it). A file whose signature does not verify (written by anything else, truncated, or renamed from
  another entry) is never unpickled or deserialised: it is treated as absent and compiled again.

jax's own cache files are signed by wrapping the cache object jax builds (`SignedCache`, installed on jax's
`get_file_cache`); where jax's internals differ from what this expects, jax's cache is left off rather than used
unsigned. Paths with a scheme (gs://...) are not local files: refused with a warning (their bucket's access control
would be the trust boundary, which this module cannot check).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import stat
import warnings

KEY_FILE = ".jaxinfer-signing-key"
MAGIC = b"JXSIG1\0\0"
_MAC = 32
_warned: set[str] = set()  # directories refused so far: one warning each per process


def unsafe_reason(directory: str) -> str | None:
    """Why `directory` may not hold code this process loads, or None (creating it, private, if missing)."""
    directory = os.fspath(directory)
    if "://" in directory:
        return "not a local directory (its access cannot be checked here)"
    if os.name != "posix":
        return None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as e:
        return f"not usable ({e})"
    if st.st_uid != os.getuid():
        return f"owned by another user (uid {st.st_uid}; this process runs as {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by its group or others (mode {stat.S_IMODE(st.st_mode):o}; `chmod go-w` it)"
    return None


def signing_key(directory: str) -> bytes | None:
    """The directory's signing key (made on first use), or None with a warning if the directory or key is not
    private to this user."""
    directory = os.fspath(directory)
    why = unsafe_reason(directory)
    path = os.path.join(directory, KEY_FILE)
    if why is None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            why = f"its signing key could not be made ({e})"
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    if why is None:
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or (os.name == "posix" and (
                    st.st_uid != os.getuid() or st.st_mode & 0o077)):
                why = f"its signing key {KEY_FILE} is not a private file of this user"
            else:
                with open(path, "rb") as f:
                    key = f.read()
                if len(key) < 32:
                    why = f"its signing key {KEY_FILE} is damaged"
        except OSError as e:
            why = f"its signing key could not be read ({e})"
    if why is not None:
        if directory not in _warned:
            _warned.add(directory)
            warnings.warn(f"compilation cache {directory} not used: {why}; programs are compiled instead",
                          stacklevel=3)
        return None
    return key


def _mac(key: bytes, name: str, blob: bytes) -> bytes:
    return hmac.new(key, name.encode() + b"\0" + blob, hashlib.sha256).digest()


def sign(key: bytes, name: str, blob: bytes) -> bytes:
    """blob as stored: MAGIC, then the HMAC of (name, blob), then blob."""
    return MAGIC + _mac(key, name, blob) + blob


def verify(key: bytes, name: str, data: bytes) -> bytes | None:
    """The blob `sign` wrapped, or None when `data` was not signed with `key` under `name`."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _MAC:
        return None
    mac, blob = data[len(MAGIC):len(MAGIC) + _MAC], data[len(MAGIC) + _MAC:]
    return blob if hmac.compare_digest(mac, _mac(key, name, blob)) else None


@functools.cache
def _signed_cache_class():
    from jax._src.compilation_cache_interface import CacheInterface

    class SignedCache(CacheInterface):
        """jax's file cache with each entry signed (`sign`) and checked on read: an entry that fails is a miss."""

        def __init__(self, base, key: bytes):
            self._base, self._key = base, key

        @property
        def _path(self):
            return self._base._path

        @_path.setter
        def _path(self, value):
            self._base._path = value

        def get(self, key: str):
            data = self._base.get(key)
            return None if data is None else verify(self._key, key, data)

        def put(self, key: str, value: bytes):
            self._base.put(key, sign(self._key, key, value))

    return SignedCache


def sign_jax_cache(directory: str) -> bool:
    """Make jax's persistent cache sign and check its entries (see the module docstring); False if it cannot be done
    here (the directory is not private, or jax's internals are not as expected): then jax's cache must stay off."""
    key = signing_key(directory)
    if key is None:
        return False
    try:
        from jax._src import compilation_cache as cc

        SignedCache = _signed_cache_class()
        base = getattr(cc.get_file_cache, "_jaxinfer_base", cc.get_file_cache)
    except (ImportError, AttributeError) as e:
        warnings.warn(f"jax's compilation cache left off: its entries cannot be signed with this jax ({e})",
                      stacklevel=2)
        return False
    keys = {os.path.abspath(directory): key}

    def get_file_cache(path):
        made = base(path)
        if made is None:
            return None
        cache, where = made
        k = keys.get(os.path.abspath(os.fspath(path))) or signing_key(path)
        return None if k is None else (SignedCache(cache, k), where)

    get_file_cache._jaxinfer_base = base
    cc.get_file_cache = get_file_cache
    if cc._cache is not None and not isinstance(cc._cache, SignedCache):  # made before: unsigned, so dropped
        cc.reset_cache()
    return True

"""The encoder cache: pretrained encoders stored by content, checked on every load.

Layout of a cache root (one folder per encoder, named by an id derived from its content)::

    <root>/
        ld-3f9a0c1b2d4e/
            manifest.json          # EncoderManifest as JSON (method, architecture, spacing, ...)
            weights.safetensors    # the state dict; its sha256 and size are in the manifest

The id is ``f"{method}-{digest[:12]}"`` where ``digest`` is the sha256 of the canonical manifest
(every field except ``created``, ``weights_sha256`` and ``weights_size``) followed by the sha256 of
the weights file: the same encoder saved twice gets the same id, and an edited manifest no longer
matches its folder name.

Writes are atomic: an entry is written into a ``.tmp-*`` folder inside the root, flushed to disk
and renamed into place in one step, so a killed save or two processes saving the same encoder at
once never leave a broken entry (a killed save leaves only a hidden ``.tmp-*`` folder, ignored by
every read and swept away by a later save). Weights are only ever read with ``safetensors``: nothing
is unpickled from a cache file or an exported file.

Besides the user cache (``default_cache_dir()``), read-only *bundled* roots are searched after it:
by default ``AnatSSLLib/bundled_encoders/`` inside the package, whose ``DEFAULT`` file names the encoder
the tools use when none is given.

Testing hook: when the environment variable ``ANATSSL_CACHE_TEST_PAUSE_S`` holds a number, a save
sleeps that many seconds after writing its files and before the final rename (to test killed and
concurrent saves).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import CacheError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "EXPORT_SUFFIX",
    "EncoderManifest",
    "EncoderCache",
    "default_cache_dir",
    "default_bundled_dirs",
    "default_encoder_id",
]

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
EXPORT_INFO_NAME = "anatssl-export.json"
EXPORT_SUFFIX = ".anatssl"
EXPORT_FORMAT = "anatssl-encoder"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_FILE_NAME = "DEFAULT"

_PAUSE_ENV = "ANATSSL_CACHE_TEST_PAUSE_S"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_STALE_TMP_S = 6 * 3600.0
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1 << 20

_METHOD_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ID_RE = re.compile(r"^([a-z][a-z0-9_]*)-([0-9a-f]{12})$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Fields that do not take part in the content id.
_ID_EXCLUDED = ("created", "weights_sha256", "weights_size")


# --------------------------------------------------------------------------------------- folders


def default_cache_dir() -> Path:
    """The user's encoder cache folder.

    ``$ANATSSL_CACHE`` if set, else the platform's user cache folder + ``anatssl/encoders``:
    ``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows. The folder is not created here.
    """
    env = os.environ.get("ANATSSL_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base_env = os.environ.get("LOCALAPPDATA", "").strip()
        base = Path(base_env) if base_env else Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "anatssl" / "encoders"


def default_bundled_dirs() -> tuple[Path, ...]:
    """Read-only roots shipped with the package (``AnatSSLLib/bundled_encoders/``; may be absent)."""
    return (Path(__file__).resolve().parent / "bundled_encoders",)


# -------------------------------------------------------------------------------------- manifest


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types for ``value`` (numpy scalars/arrays, tuples, Paths converted)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CacheError(f"manifest field {where}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CacheError(f"manifest field {where}: keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise CacheError(
        f"manifest field {where}: expected JSON data (str, number, bool, list, dict), "
        f"got {type(value).__name__}"
    )


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


@dataclass(kw_only=True)
class EncoderManifest:
    """What a cached encoder is and how to use it.

    Args:
        method: pretraining method, e.g. ``"ld"``, ``"alice"``, ``"awcl"`` (lower case, ``[a-z0-9_]``).
        architecture: network name in the model registry (e.g. ``"ld_unet3d"``).
        architecture_params: keyword arguments that rebuild the network.
        embedding_dim: channels of the per-voxel (or per-pixel) embedding.
        spatial_dims: 2 or 3.
        spacing: expected input spacing in mm, ``spatial_dims`` values (x, y[, z]), or None (any).
        intensity: how inputs are normalised, e.g. ``{"kind": "percentile", "lower": 0.5, "upper": 99.5}``.
        data_fingerprint: identifies the training data (e.g. a sha256 over file names and sizes).
        training: training settings (epochs, batch size, learning rate, seed, ...).
        metrics: evaluation figures, e.g. ``{"landmark_mre_mm": 3.1}``.
        library_version: AnatSSL version that trained it.
        created: ISO 8601 UTC time of creation (not part of the id).
        name: optional human label; ``EncoderCache.resolve`` accepts it.
        description: free text.
        weights_sha256, weights_size: sha256 (hex) and size in bytes of the weights file; filled by
            ``EncoderCache.save``.
        format_version: manifest format version.
        extra: fields this version does not know (kept so that a newer manifest round-trips).
    """

    method: str
    architecture: str
    embedding_dim: int
    spatial_dims: int
    architecture_params: dict[str, Any] = field(default_factory=dict)
    spacing: list[float] | None = None
    intensity: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    created: str = field(default_factory=_utc_now_iso)
    name: str | None = None
    description: str = ""
    weights_sha256: str | None = None
    weights_size: int | None = None
    format_version: int = MANIFEST_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- validation --------------------------------------------------------------------------

    def validate(self, source: str = "manifest") -> EncoderManifest:
        """Check every field; raise CacheError naming ``source``, the field, expected and got."""

        def bad(name: str, expected: str, got: Any) -> CacheError:
            return CacheError(f"{source}: field '{name}' must be {expected}, got {got!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.method, str) or not _METHOD_RE.match(self.method):
            raise bad("method", "a lower-case name such as 'ld', 'alice' or 'awcl'", self.method)
        if not isinstance(self.architecture, str) or not self.architecture.strip():
            raise bad("architecture", "a non-empty model name", self.architecture)
        if not is_int(self.embedding_dim) or self.embedding_dim <= 0:
            raise bad("embedding_dim", "a positive integer", self.embedding_dim)
        if not is_int(self.spatial_dims) or self.spatial_dims not in (2, 3):
            raise bad("spatial_dims", "2 or 3", self.spatial_dims)
        for name in ("architecture_params", "intensity", "training", "metrics", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a JSON object (dict)", getattr(self, name))
        if self.spacing is not None:
            sp = self.spacing
            if (
                not isinstance(sp, (list, tuple))
                or len(sp) != self.spatial_dims
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sp)
                or not all(math.isfinite(v) and v > 0 for v in sp)
            ):
                raise bad("spacing", f"None or {self.spatial_dims} positive numbers in mm", sp)
        for name in ("data_fingerprint", "library_version", "description"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string", getattr(self, name))
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise bad("name", "None or a non-empty string", self.name)
        if not isinstance(self.created, str):
            raise bad("created", "an ISO 8601 time such as '2026-01-31T12:00:00Z'", self.created)
        try:
            _parse_iso(self.created)
        except ValueError:
            raise bad("created", "an ISO 8601 time such as '2026-01-31T12:00:00Z'", self.created) from None
        if self.weights_sha256 is not None and (
            not isinstance(self.weights_sha256, str) or not _SHA_RE.match(self.weights_sha256)
        ):
            raise bad("weights_sha256", "None or 64 lower-case hex digits", self.weights_sha256)
        if self.weights_size is not None and (not is_int(self.weights_size) or self.weights_size < 0):
            raise bad("weights_size", "None or a non-negative integer", self.weights_size)
        if not is_int(self.format_version) or self.format_version < 1:
            raise bad("format_version", "a positive integer", self.format_version)
        if self.format_version > MANIFEST_FORMAT_VERSION:
            raise CacheError(
                f"{source}: manifest format_version {self.format_version} is newer than this "
                f"AnatSSL ({__version__}) understands (<= {MANIFEST_FORMAT_VERSION}); upgrade AnatSSL"
            )
        overlap = set(self.extra) & {f.name for f in dataclasses.fields(self)}
        if overlap:
            raise bad("extra", "keys that are not manifest fields", sorted(overlap))
        return self

    # -- conversion --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (``extra`` merged in at the top level)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "spacing" and isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                value = [float(v) for v in value]  # 1 and 1.0 give the same id
            out[f.name] = _jsonable(value, f.name)
        for k, v in self.extra.items():
            out[k] = _jsonable(v, k)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> EncoderManifest:
        """Build and validate a manifest; CacheError names ``source`` and the missing/bad field."""
        if not isinstance(data, Mapping):
            raise CacheError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        required = [n for n, f in known.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise CacheError(
                f"{source}: missing required field(s) {', '.join(repr(m) for m in missing)} "
                f"(a manifest needs {', '.join(required)})"
            )
        kwargs = {k: data[k] for k in known if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        if "extra" in data:
            raise CacheError(f"{source}: 'extra' is a reserved name, not a manifest field")
        if isinstance(kwargs.get("spacing"), tuple):
            kwargs["spacing"] = list(kwargs["spacing"])
        return cls(**kwargs, extra=extra).validate(source)

    def content_digest(self, weights_sha256: str) -> str:
        """sha256 (hex) of the canonical manifest (without time and weights fields) + weights digest."""
        d = {k: v for k, v in self.to_dict().items() if k not in _ID_EXCLUDED}
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        h = hashlib.sha256(canonical.encode("utf-8"))
        h.update(b"\0")
        h.update(weights_sha256.encode("ascii"))
        return h.hexdigest()

    def content_id(self, weights_sha256: str) -> str:
        """The cache id of this manifest with these weights: ``f"{method}-{digest[:12]}"``."""
        return f"{self.method}-{self.content_digest(weights_sha256)[:12]}"


# ------------------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
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


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _manifest_bytes(manifest: EncoderManifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def _test_pause() -> None:
    value = os.environ.get(_PAUSE_ENV, "").strip()
    if value:
        try:
            seconds = float(value)
        except ValueError:
            return
        if seconds > 0:
            time.sleep(seconds)


def _prepare_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors safetensors can write; CacheError on anything else."""
    import torch

    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CacheError(
            "save: expected a non-empty mapping of parameter name -> torch.Tensor "
            f"(e.g. model.state_dict()), got {type(state_dict).__name__} of length "
            f"{len(state_dict) if isinstance(state_dict, Mapping) else 'n/a'}"
        )
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CacheError(f"save: state dict keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise CacheError(f"save: state dict entry {key!r} must be a torch.Tensor, got {type(value).__name__}")
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:  # tied weights: safetensors refuses tensors that share memory
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            storages.add(ptr)
        out[key] = t
    return out


# --------------------------------------------------------------------------------------- the cache


class EncoderCache:
    """Encoders stored by content in a user folder, plus read-only bundled folders.

    Args:
        root: the user cache folder (created on first save); default ``default_cache_dir()``.
        bundled: read-only roots searched after ``root``; default ``default_bundled_dirs()``.
            Absent or empty folders are fine.

    Example::

        cache = EncoderCache()
        eid = cache.save(model.state_dict(), EncoderManifest(method="ld", architecture="ld_unet3d",
                                                             embedding_dim=32, spatial_dims=3))
        state, manifest = cache.load(eid)
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        bundled: Sequence[Path | str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.bundled: tuple[Path, ...] = tuple(
            Path(p).expanduser() for p in (default_bundled_dirs() if bundled is None else bundled)
        )

    def __repr__(self) -> str:
        return f"EncoderCache(root={str(self.root)!r}, bundled={[str(p) for p in self.bundled]!r})"

    # -- discovery ---------------------------------------------------------------------------

    def _roots(self) -> Iterator[tuple[Path, str]]:
        yield self.root, "user"
        for b in self.bundled:
            if b.resolve() != self.root.resolve():
                yield b, "bundled"

    def _entries(self) -> dict[str, tuple[Path, str]]:
        """id -> (entry folder, origin); the user cache wins over bundled roots."""
        found: dict[str, tuple[Path, str]] = {}
        for root, origin in self._roots():
            if not root.is_dir():
                continue
            try:
                children = sorted(root.iterdir())
            except OSError as exc:
                warnings.warn(f"encoder cache {root} cannot be read: {exc}", stacklevel=3)
                continue
            for child in children:
                if _ID_RE.match(child.name) and child.is_dir() and child.name not in found:
                    found[child.name] = (child, origin)
        return found

    def ids(self) -> list[str]:
        """Every entry id (user cache first, then bundled), without reading the entries."""
        return list(self._entries())

    def resolve(self, query: str) -> str:
        """The id named by ``query``: a full id, a unique id prefix, a unique ``name``, or ``"default"``.

        Raises:
            CacheError: nothing matches (the message lists what is there) or the match is ambiguous.
        """
        if not isinstance(query, str) or not query.strip():
            raise CacheError(f"encoder id: expected an id, id prefix or name, got {query!r}")
        query = query.strip()
        entries = self._entries()
        if query in entries:
            return query
        if query == "default":
            default = self.default_encoder_id()
            if default is None:
                raise CacheError(
                    "encoder 'default': no default encoder is bundled (no DEFAULT file in "
                    f"{', '.join(str(b) for b in self.bundled) or 'any bundled folder'}); "
                    "give an encoder id from `anatssl cache list`"
                )
            return default
        prefixed = [i for i in entries if i.startswith(query)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise CacheError(
                f"encoder {query!r} is ambiguous: it starts {len(prefixed)} ids "
                f"({', '.join(prefixed[:6])}{', ...' if len(prefixed) > 6 else ''}); give more characters"
            )
        named = []
        for eid, (folder, _origin) in entries.items():
            try:
                m = self._read_manifest(eid, folder)
            except CacheError:
                continue
            if m.name == query:
                named.append(eid)
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise CacheError(
                f"encoder name {query!r} is ambiguous: {len(named)} encoders carry it "
                f"({', '.join(named)}); give the id instead"
            )
        known = list(entries)
        hint = (
            f"known ids: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''}"
            if known
            else "the cache is empty"
        )
        raise CacheError(
            f"unknown encoder {query!r}: expected an id, a unique id prefix or a name in the encoder "
            f"cache {self.root} (or bundled encoders); {hint} (see `anatssl cache list`)"
        )

    def _locate(self, encoder_id: str) -> tuple[str, Path, str]:
        eid = self.resolve(encoder_id)
        folder, origin = self._entries()[eid]
        return eid, folder, origin

    def path(self, encoder_id: str) -> Path:
        """The folder of an entry (id, prefix or name accepted)."""
        return self._locate(encoder_id)[1]

    def origin(self, encoder_id: str) -> str:
        """``"user"`` or ``"bundled"``."""
        return self._locate(encoder_id)[2]

    # -- reading -----------------------------------------------------------------------------

    def _read_manifest(self, eid: str, folder: Path) -> EncoderManifest:
        mpath = folder / MANIFEST_NAME
        if not mpath.is_file():
            raise CacheError(
                f"encoder {eid}: {mpath} is missing: the entry is incomplete; remove it with "
                f"`anatssl cache rm {eid}` and save or import it again"
            )
        try:
            raw = mpath.read_bytes()
            if len(raw) > _MAX_MANIFEST_BYTES:
                raise CacheError(
                    f"encoder {eid}: {mpath} is {len(raw)} bytes, expected a manifest under "
                    f"{_MAX_MANIFEST_BYTES} bytes"
                )
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheError(
                f"encoder {eid}: {mpath} is not valid JSON ({exc}): the file was altered or "
                f"truncated; remove the entry with `anatssl cache rm {eid}` or import it again"
            ) from None
        except OSError as exc:
            raise CacheError(f"encoder {eid}: cannot read {mpath}: {exc}") from None
        manifest = EncoderManifest.from_dict(data, source=f"encoder {eid}: {mpath}")
        if manifest.weights_sha256 is None or manifest.weights_size is None:
            raise CacheError(
                f"encoder {eid}: {mpath} has no weights_sha256/weights_size: expected a manifest "
                "written by EncoderCache.save"
            )
        expected = manifest.content_id(manifest.weights_sha256)
        if expected != eid:
            raise CacheError(
                f"encoder {eid}: {mpath} does not match the entry id (its content gives id "
                f"{expected}): the manifest was altered; remove the entry with "
                f"`anatssl cache rm {eid}` or import it again"
            )
        return manifest

    def manifest(self, encoder_id: str) -> EncoderManifest:
        """The validated manifest of an entry (weights not read)."""
        eid, folder, _ = self._locate(encoder_id)
        return self._read_manifest(eid, folder)

    def _checked_weights(self, eid: str, folder: Path, manifest: EncoderManifest) -> bytes:
        wpath = folder / WEIGHTS_NAME
        if not wpath.is_file():
            raise CacheError(
                f"encoder {eid}: weights file {wpath} is missing: the entry is incomplete; remove it "
                f"with `anatssl cache rm {eid}` and save or import it again"
            )
        try:
            data = wpath.read_bytes()
        except OSError as exc:
            raise CacheError(f"encoder {eid}: cannot read weights file {wpath}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.weights_sha256 or len(data) != manifest.weights_size:
            raise CacheError(
                f"encoder {eid}: weights file {wpath} sha256 mismatch (expected "
                f"{manifest.weights_sha256[:16]}... of {manifest.weights_size} bytes, got "
                f"{digest[:16]}... of {len(data)} bytes): the file was altered or truncated; "
                f"remove the entry with `anatssl cache rm {eid}` or import it again"
            )
        return data

    def verify(self, encoder_id: str) -> str:
        """Check manifest and weights digest of an entry; return its id or raise CacheError."""
        eid, folder, _ = self._locate(encoder_id)
        self._checked_weights(eid, folder, self._read_manifest(eid, folder))
        return eid

    def load(
        self, encoder_id: str, *, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, torch.Tensor], EncoderManifest]:
        """State dict and manifest of an entry; the weights' sha256 is checked on every load.

        Weights are read with ``safetensors`` only (never ``torch.load``/pickle).

        Raises:
            CacheError: unknown id, missing file, altered manifest or weights.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        eid, folder, _ = self._locate(encoder_id)
        manifest = self._read_manifest(eid, folder)
        data = self._checked_weights(eid, folder, manifest)
        try:
            state = st_load(data)
        except (SafetensorError, ValueError) as exc:
            raise CacheError(
                f"encoder {eid}: {folder / WEIGHTS_NAME} is not a readable safetensors file ({exc})"
            ) from None
        if str(device) != "cpu":
            state = {k: v.to(device) for k, v in state.items()}
        return state, manifest

    def list(self) -> list[tuple[str, EncoderManifest, str]]:
        """``(id, manifest, origin)`` of every readable entry, origin ``"user"`` or ``"bundled"``.

        Unreadable entries are skipped with a warning naming them (``load`` gives the full error).
        """
        rows = []
        for eid, (folder, origin) in self._entries().items():
            try:
                rows.append((eid, self._read_manifest(eid, folder), origin))
            except CacheError as exc:
                warnings.warn(f"skipping broken encoder cache entry: {exc}", stacklevel=2)
        order = {"user": 0, "bundled": 1}
        rows.sort(key=lambda r: (order.get(r[2], 2), r[1].created, r[0]))
        return rows

    def default_encoder_id(self) -> str | None:
        """The id named in ``<bundled root>/DEFAULT`` (first bundled root that has one), else None.

        Raises:
            CacheError: a DEFAULT file names an encoder that is not there.
        """
        return default_encoder_id(self.bundled)

    # -- writing -----------------------------------------------------------------------------

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"encoder cache {self.root}: cannot create the folder ({exc}); choose another with "
                "the ANATSSL_CACHE variable or --cache-dir"
            ) from None
        if self.root.resolve() in {b.resolve() for b in self.bundled}:
            raise CacheError(f"encoder cache {self.root} is a bundled (read-only) folder; choose another")

    def _sweep(self) -> None:
        """Remove leftovers of killed saves (old ``.tmp-*``) and of removals (``.trash-*``)."""
        now = time.time()
        try:
            children = list(self.root.iterdir())
        except OSError:
            return
        for child in children:
            try:
                if child.name.startswith(_TRASH_PREFIX) or (
                    child.name.startswith(_TMP_PREFIX) and now - child.stat().st_mtime > _STALE_TMP_S
                ):
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass

    def _commit(self, tmp: Path, eid: str, label: str) -> str:
        """Rename a complete temp folder to ``root/eid``; keep an existing valid entry."""
        final = self.root / eid
        _fsync_dir(tmp)
        _test_pause()
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not final.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise CacheError(f"{label}: cannot move the new entry into {final}: {exc}") from None
            # Same content already there (another process, or an earlier save).
            try:
                existing = self._read_manifest(eid, final)
                self._checked_weights(eid, final, existing)
            except CacheError:
                # The existing entry is damaged: swap it out for the fresh copy.
                trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=self.root))
                try:
                    os.rename(final, trash / eid)
                    os.rename(tmp, final)
                except OSError:
                    pass
                shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)
        return eid

    def _new_tmp(self, eid: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{eid}-", dir=self.root))
        try:
            os.chmod(tmp, 0o755)
        except OSError:
            pass
        return tmp

    def save(self, state_dict: Mapping[str, torch.Tensor], manifest: EncoderManifest) -> str:
        """Store weights + manifest atomically; return the content id.

        ``manifest.weights_sha256``/``weights_size`` are filled in on a copy (the argument is not
        changed). Saving the same content again (or from two processes at once) returns the same
        id and keeps one valid entry.

        Raises:
            CacheError: invalid manifest or state dict, or the cache folder cannot be written.
        """
        from safetensors.torch import save as st_save

        if not isinstance(manifest, EncoderManifest):
            raise CacheError(f"save: expected an EncoderManifest, got {type(manifest).__name__}")
        manifest.validate("save: manifest")
        tensors = _prepare_state_dict(state_dict)
        try:
            data = st_save(tensors)
        except Exception as exc:  # safetensors raises several types for odd tensors
            raise CacheError(f"save: the state dict cannot be written as safetensors: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        m = dataclasses.replace(manifest, weights_sha256=digest, weights_size=len(data))
        m.validate("save: manifest")
        eid = m.content_id(digest)

        self._ensure_root()
        self._sweep()
        final = self.root / eid
        if final.is_dir():
            try:
                self._checked_weights(eid, final, self._read_manifest(eid, final))
                return eid
            except CacheError:
                pass  # damaged: write a fresh copy over it below
        try:
            tmp = self._new_tmp(eid)
        except OSError as exc:
            raise CacheError(
                f"encoder cache {self.root}: cannot write ({exc}); choose another folder with the "
                "ANATSSL_CACHE variable or --cache-dir"
            ) from None
        try:
            _write_file(tmp / WEIGHTS_NAME, data)
            _write_file(tmp / MANIFEST_NAME, _manifest_bytes(m))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._commit(tmp, eid, f"save {eid}")

    def remove(self, encoder_id: str) -> str:
        """Delete a user-cache entry (atomically: renamed away, then deleted); return its id.

        Raises:
            CacheError: unknown id, or a bundled (read-only) entry.
        """
        eid, folder, origin = self._locate(encoder_id)
        if origin != "user":
            raise CacheError(
                f"encoder {eid} is bundled with AnatSSL in {folder.parent} and is read-only; "
                "only encoders in the user cache can be removed"
            )
        trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=self.root))
        try:
            os.rename(folder, trash / eid)
        except OSError as exc:
            shutil.rmtree(trash, ignore_errors=True)
            raise CacheError(f"encoder {eid}: cannot remove {folder}: {exc}") from None
        shutil.rmtree(trash, ignore_errors=True)
        return eid

    # -- export / import ---------------------------------------------------------------------

    def export(self, encoder_id: str, path: Path | str) -> Path:
        """Write one entry to a single file (a stored zip: manifest, weights, export info).

        The entry is verified first; the file is written atomically (temp file + rename).
        The conventional suffix is ``.anatssl``. Returns the path written.
        """
        eid, folder, _ = self._locate(encoder_id)
        manifest = self._read_manifest(eid, folder)
        self._checked_weights(eid, folder, manifest)
        out = Path(path).expanduser()
        if out.is_dir():
            out = out / f"{eid}{EXPORT_SUFFIX}"
        if not out.parent.is_dir():
            raise CacheError(f"export {eid}: folder {out.parent} does not exist")
        info = {"format": EXPORT_FORMAT, "format_version": 1, "id": eid}
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(EXPORT_INFO_NAME, json.dumps(info, indent=2) + "\n")
                zf.write(folder / MANIFEST_NAME, MANIFEST_NAME)
                zf.write(folder / WEIGHTS_NAME, WEIGHTS_NAME)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CacheError(f"export {eid}: cannot write {out}: {exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    def import_(self, path: Path | str) -> str:
        """Add the encoder in an exported file to the user cache (atomically); return its id.

        The file's weights digest and id are checked; an altered file is rejected.

        Raises:
            CacheError: not an AnatSSL export, altered content, or the cache cannot be written.
        """
        src = Path(path).expanduser()
        label = f"import {src}"
        if not src.is_file():
            raise CacheError(f"{label}: no such file (expected an exported encoder, *{EXPORT_SUFFIX})")
        expected_names = {EXPORT_INFO_NAME, MANIFEST_NAME, WEIGHTS_NAME}
        try:
            zf = zipfile.ZipFile(src, "r")
        except (zipfile.BadZipFile, OSError) as exc:
            raise CacheError(
                f"{label}: not an exported AnatSSL encoder (expected a {EXPORT_SUFFIX} file written "
                f"by `anatssl cache export`): {exc}"
            ) from None
        with zf:
            names = {i.filename for i in zf.infolist()}
            if names != expected_names:
                raise CacheError(
                    f"{label}: expected exactly {sorted(expected_names)} inside, got {sorted(names)}"
                )
            try:
                if zf.getinfo(EXPORT_INFO_NAME).file_size > _MAX_MANIFEST_BYTES or \
                        zf.getinfo(MANIFEST_NAME).file_size > _MAX_MANIFEST_BYTES:
                    raise CacheError(f"{label}: manifest larger than {_MAX_MANIFEST_BYTES} bytes")
                info = json.loads(zf.read(EXPORT_INFO_NAME).decode("utf-8"))
                manifest_raw = zf.read(MANIFEST_NAME)
                data = json.loads(manifest_raw.decode("utf-8"))
            except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
                raise CacheError(f"{label}: the file is damaged or altered ({exc})") from None
            if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
                raise CacheError(f"{label}: {EXPORT_INFO_NAME} does not declare format {EXPORT_FORMAT!r}")
            manifest = EncoderManifest.from_dict(data, source=f"{label}: {MANIFEST_NAME}")
            if manifest.weights_sha256 is None or manifest.weights_size is None:
                raise CacheError(f"{label}: {MANIFEST_NAME} has no weights_sha256/weights_size")
            eid = manifest.content_id(manifest.weights_sha256)
            if info.get("id") != eid:
                raise CacheError(
                    f"{label}: the manifest does not match the exported id (file says "
                    f"{info.get('id')!r}, content gives {eid}): the file was altered"
                )
            if zf.getinfo(WEIGHTS_NAME).file_size != manifest.weights_size:
                raise CacheError(
                    f"{label}: weights are {zf.getinfo(WEIGHTS_NAME).file_size} bytes, the manifest "
                    f"expects {manifest.weights_size}: the file was altered or truncated"
                )
            self._ensure_root()
            self._sweep()
            final = self.root / eid
            if final.is_dir():
                try:
                    self._checked_weights(eid, final, self._read_manifest(eid, final))
                    return eid
                except CacheError:
                    pass
            tmp = self._new_tmp(eid)
            try:
                h = hashlib.sha256()
                with zf.open(WEIGHTS_NAME) as fin, open(tmp / WEIGHTS_NAME, "wb") as fout:
                    while chunk := fin.read(_CHUNK):
                        h.update(chunk)
                        fout.write(chunk)
                    fout.flush()
                    os.fsync(fout.fileno())
                if h.hexdigest() != manifest.weights_sha256:
                    raise CacheError(
                        f"{label}: weights sha256 mismatch (expected {manifest.weights_sha256[:16]}..., "
                        f"got {h.hexdigest()[:16]}...): the file was altered; export it again"
                    )
                self._check_safetensors(tmp / WEIGHTS_NAME, label)
                _write_file(tmp / MANIFEST_NAME, manifest_raw)
            except zipfile.BadZipFile as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CacheError(f"{label}: the file is damaged or altered ({exc})") from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self._commit(tmp, eid, label)

    @staticmethod
    def _check_safetensors(path: Path, label: str) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, ValueError, OSError) as exc:
            raise CacheError(f"{label}: weights are not a readable safetensors file ({exc})") from None


def default_encoder_id(bundled: Sequence[Path | str] | None = None) -> str | None:
    """The id named in the first ``<bundled root>/DEFAULT`` file, else None.

    Args:
        bundled: roots to look in; default ``default_bundled_dirs()``.

    Raises:
        CacheError: a DEFAULT file names an encoder folder that is not beside it.
    """
    for root in (default_bundled_dirs() if bundled is None else bundled):
        dfile = Path(root) / DEFAULT_FILE_NAME
        if not dfile.is_file():
            continue
        lines = dfile.read_text(encoding="utf-8").strip().splitlines()
        eid = lines[0].strip() if lines else ""
        if not eid:
            continue
        if not _ID_RE.match(eid) or not (Path(root) / eid).is_dir():
            raise CacheError(
                f"{dfile} names default encoder {eid!r}, but there is no such encoder folder in "
                f"{root}: the bundled encoders are incomplete; reinstall AnatSSL"
            )
        return eid
    return None

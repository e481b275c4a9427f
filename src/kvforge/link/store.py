"""Where encoded documents live: `DocumentStore` on disk, `MemoryStore` in memory. Both answer `get(ids) -> DocKV`,
encoding (and keeping) a document the first time it is asked for.

`DocumentStore(path, model, tokenizer)`:
- content-addressed: key = sha256(model identity, press, token ids); one store serves one model (its identity is
  recorded on creation, and opening it with another model is an error);
- one safetensors file per entry (keys, values and, for press-compressed documents, slots and validity, plus the
  token ids), named by the key *and* its checksum, in `objects/`; a SQLite index (`index.sqlite`: model, press,
  tokens, bytes, checksum, file, created, last used);
- atomic: the file is written under a temporary name, flushed to disk and renamed, then its index row is committed;
  a killed writer leaves at most a temporary file or an unreferenced file (never a row pointing to a partial
  file), and two writers of one document write the same content under the same name;
- verified: the checksum of the file is checked on every read, and the file's own header must name the same key,
  model and ids; a bad entry is reported (a warning), dropped and encoded again — never used;
- bounded: with `max_bytes`, the least recently used entries are evicted after each write.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from kvforge.cache import layer_plan
from kvforge.errors import KVForgeError
from kvforge.link.docs import DocKV, LayerKV, encode_document, model_identity, model_label

FORMAT = "kvforge-link-1"
CHUNK_BYTES = 8 << 20  # files are written in chunks of this size
HASH_CHUNK = 8 << 20  # part of the format: the checksum hashes chunks of this size in parallel
ORPHAN_AGE_S = 600.0  # unreferenced or temporary files older than this are removed when a store opens


def press_spec(press) -> str:
    """The press a document was stored with, as part of its key ("none" without one)."""
    if press is None:
        return "none"
    return json.dumps([press.name, press.options()], sort_keys=True, default=str)


def checksum(data: bytes | memoryview) -> str:
    """sha256 over the sha256 digests of consecutive `HASH_CHUNK`-byte chunks (hashed in parallel: hashlib releases
    the GIL, so a large entry is verified at several times one core's sha256 speed)."""
    view = memoryview(data)
    chunks = [view[i : i + HASH_CHUNK] for i in range(0, max(len(view), 1), HASH_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(8, len(chunks))) as pool:
        digests = list(pool.map(lambda c: hashlib.sha256(c).digest(), chunks))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def document_key(identity: str, press: str, ids) -> str:
    h = hashlib.sha256(f"{FORMAT}\n{identity}\n{press}\n".encode())
    h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def serialize(doc: DocKV, key: str, identity: str, press: str) -> bytes:
    """The safetensors bytes of an entry: `ids`, per layer `{i}.k`, `{i}.v` (and `{i}.slots`). Layers with per-head
    validity store only their valid entries (`{i}.k` is then `[n_valid, D]`) plus `{i}.valid` to put them back."""
    tensors = {"ids": torch.tensor(doc.ids, dtype=torch.int64)}
    for i, layer in enumerate(doc.layers):
        keys, values, slots = layer.keys, layer.values, layer.slots
        if layer.valid is not None:
            keys, values, slots = keys[layer.valid], values[layer.valid], layer.positions()[layer.valid]
            tensors[f"{i}.valid"] = layer.valid
        tensors[f"{i}.k"], tensors[f"{i}.v"] = keys, values
        if slots is not None:
            tensors[f"{i}.slots"] = slots
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "key": key, "model": identity, "press": press,
            "starts": json.dumps([layer.start for layer in doc.layers])}
    return st_save(tensors, metadata=meta)


def _unpack(packed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[n_valid, ...]` entries back into a zero-padded `[1, H, n, ...]` block at the places `valid` marks."""
    out = packed.new_zeros(*valid.shape, *packed.shape[1:])
    out[valid] = packed
    return out


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _views(buf: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of safetensors bytes held in a uint8 tensor `buf`; the tensors view `buf` (no copy;
    safetensors aligns every tensor to its element size)."""
    (n,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
    header = json.loads(buf[8 : 8 + n].numpy().tobytes())
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = buf[8 + n + a : 8 + n + b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return meta, out


def deserialize(data: bytes | torch.Tensor) -> tuple[dict, DocKV]:
    """(header metadata, DocKV on the CPU) from an entry's bytes (a uint8 tensor is viewed, not copied)."""
    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    meta, t = _views(buf)
    layers = []
    for i, start in enumerate(json.loads(meta["starts"])):
        keys, values, slots, valid = t[f"{i}.k"], t[f"{i}.v"], t.get(f"{i}.slots"), t.get(f"{i}.valid")
        if valid is not None:
            keys, values, slots = _unpack(keys, valid), _unpack(values, valid), _unpack(slots, valid)
        layers.append(LayerKV(keys, values, slots, valid, start))
    return meta, DocKV(tuple(t["ids"].tolist()), layers)


def read_verified(path: Path, pin: bool = False) -> tuple[torch.Tensor, str]:
    """A file's bytes (a uint8 tensor, in pinned memory with `pin`, for fast copies to the GPU) and their
    `checksum`, each chunk hashed in a thread while the next one is read."""
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for i in range(0, max(size, 1), HASH_CHUNK):
            chunk = view[i : i + HASH_CHUNK]
            got = 0
            while got < len(chunk):
                n = f.readinto(chunk[got:])
                if not n:
                    raise FileNotFoundError(f"{path} shrank while being read")
                got += n
            futures.append(pool.submit(lambda c: hashlib.sha256(c).digest(), chunk))
        digests = b"".join(fut.result() for fut in futures)
    return buf, hashlib.sha256(digests).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete: a temporary file in the same directory,
    written in chunks, flushed to disk, then renamed over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        view = memoryview(data)
        for i in range(0, len(view), CHUNK_BYTES):
            chunk = view[i : i + CHUNK_BYTES]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


class MemoryStore:
    """Documents encoded once (with `press` when given) and kept in memory on the model's device."""

    def __init__(self, model, tokenizer=None, press=None):
        self.model, self.tokenizer, self.press = model, tokenizer, press
        self.docs: dict[tuple[int, ...], DocKV] = {}

    def get(self, ids) -> DocKV:
        ids = tuple(int(t) for t in ids)
        if ids not in self.docs:
            self.docs[ids] = encode_document(self.model, list(ids), self.press, self.tokenizer)
        return self.docs[ids]


class DocumentStore:
    """An on-disk, content-addressed store of document KV for one model (see the module docstring).

    Args:
        path: the store's directory (created if missing).
        model, tokenizer: the model the KV is computed with (its identity is checked), and its tokenizer.
        press: store documents compressed by this press (part of each entry's key).
        max_bytes: evict least recently used entries beyond this many bytes of files (None: unbounded).
    """

    def __init__(self, path, model, tokenizer, press=None, max_bytes: int | None = None):
        self.path = Path(path)
        self.model, self.tokenizer, self.press = model, tokenizer, press
        self.max_bytes = max_bytes
        self.press_spec = press_spec(press)
        self.identity = model_identity(model)
        self.pin = next(model.parameters()).device.type == "cuda"  # read into pinned memory: faster copies to the GPU
        self.objects = self.path / "objects"
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KVForgeError(f"document store {str(self.path)!r} cannot be created: {e.strerror}") from None
        self.db = sqlite3.connect(self.path / "index.sqlite", timeout=60, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        with self._write():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, model TEXT, press TEXT, "
                            "tokens INTEGER, bytes INTEGER, checksum TEXT, file TEXT, created REAL, last_used REAL)")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('model', ?), ('label', ?), ('format', ?)",
                            (self.identity, model_label(model), FORMAT))
        meta = dict(self.db.execute("SELECT name, value FROM meta"))
        if meta["model"] != self.identity:
            raise KVForgeError(f"document store {str(self.path)!r} was built for another model ({meta['label']}, "
                               f"identity {meta['model'][:12]}); this model is {model_label(model)} "
                               f"({self.identity[:12]}): use another path")
        self.gc(ORPHAN_AGE_S)

    # -- the index ---------------------------------------------------------------------------------------
    @contextmanager
    def _write(self):
        """A write transaction (BEGIN IMMEDIATE: one writer at a time, across processes)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def key(self, ids) -> str:
        return document_key(self.identity, self.press_spec, ids)

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def stats(self) -> dict:
        """`entries` and `bytes` (files) in the index."""
        n, b = self.db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM entries").fetchone()
        return {"entries": n, "bytes": b}

    def files(self) -> list[Path]:
        """The entry files the index refers to."""
        return [self.objects / f for (f,) in self.db.execute("SELECT file FROM entries")]

    # -- reading -----------------------------------------------------------------------------------------
    def lookup(self, ids) -> DocKV | None:
        """The stored entry for `ids` (verified, on the model's device), or None when absent or bad (a bad entry
        is reported with a warning and removed)."""
        ids = tuple(int(t) for t in ids)
        key = self.key(ids)
        for _ in range(2):  # a second look when a concurrent writer replaced the entry under us
            row = self.db.execute("SELECT file, checksum FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            file, sha = row
            try:
                data, got = read_verified(self.objects / file, pin=self.pin)
            except FileNotFoundError:
                now = self.db.execute("SELECT file FROM entries WHERE key = ?", (key,)).fetchone()
                if now is not None and now[0] == file:
                    return self._bad(key, file, "its file is missing")
                continue
            doc = self._verified(data, got, sha, key, ids)
            if isinstance(doc, str):
                return self._bad(key, file, doc)
            with self._write():
                self.db.execute("UPDATE entries SET last_used = ? WHERE key = ?", (time.time(), key))
            return doc.to(next(self.model.parameters()).device)
        return None

    def _verified(self, data: torch.Tensor, got: str, sha: str, key: str, ids: tuple) -> DocKV | str:
        """The entry's DocKV, or what is wrong with it (`got`: the checksum of `data`, `sha`: the index's)."""
        if got != sha:
            return "checksum mismatch"
        try:
            meta, doc = deserialize(data)
        except Exception as e:  # noqa: BLE001 (any parse failure is a bad entry)
            return f"unreadable ({type(e).__name__})"
        if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("model") != self.identity:
            return "its header names another key, model or format"
        if doc.ids != ids or len(doc.layers) != len(layer_plan(self.model)):
            return "its token ids or layer count differ"
        return doc

    def _bad(self, key: str, file: str, problem: str) -> None:
        warnings.warn(f"document store {str(self.path)!r}: entry {key[:12]} ({file}) is bad: {problem}; it is "
                      "removed and the document encoded again", RuntimeWarning, stacklevel=3)
        with self._write():
            self.db.execute("DELETE FROM entries WHERE key = ? AND file = ?", (key, file))
        (self.objects / file).unlink(missing_ok=True)
        return None

    # -- writing -----------------------------------------------------------------------------------------
    def put(self, doc: DocKV) -> str:
        """Store an encoded document (atomically; see the module docstring). Returns its key."""
        key = self.key(doc.ids)
        data = serialize(doc, key, self.identity, self.press_spec)
        sha = checksum(data)
        file = f"{key[:2]}/{key}-{sha[:16]}.safetensors"
        (self.objects / key[:2]).mkdir(exist_ok=True)
        write_atomic(self.objects / file, data)
        now = time.time()
        with self._write():
            old = self.db.execute("SELECT file FROM entries WHERE key = ?", (key,)).fetchone()
            self.db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, self.identity, self.press_spec, doc.n_tokens, len(data), sha, file, now, now))
            evicted = self._evict(key)
        for f in evicted + ([old[0]] if old and old[0] != file else []):
            (self.objects / f).unlink(missing_ok=True)
        return key

    def _evict(self, keep: str) -> list[str]:
        """Delete the least recently used rows while the index holds more than `max_bytes` (inside a write
        transaction; never the entry just written). Returns their files."""
        if self.max_bytes is None:
            return []
        total = self.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM entries").fetchone()[0]
        files = []
        for key, file, size in self.db.execute(
                "SELECT key, file, bytes FROM entries WHERE key != ? ORDER BY last_used", (keep,)).fetchall():
            if total <= self.max_bytes:
                break
            self.db.execute("DELETE FROM entries WHERE key = ?", (key,))
            files.append(file)
            total -= size
        return files

    def get(self, ids) -> DocKV:
        """The document's KV: read from the store, or encoded (with the store's press) and stored."""
        doc = self.lookup(ids)
        if doc is None:
            doc = encode_document(self.model, [int(t) for t in ids], self.press, self.tokenizer)
            self.put(doc)
        return doc

    def get_text(self, text: str) -> DocKV:
        """`get` for a text, tokenized without special tokens."""
        return self.get(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- housekeeping ------------------------------------------------------------------------------------
    def gc(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Remove temporary files and files no index row refers to, older than `min_age_s` (younger ones may belong
        to a writer about to commit). Returns how many were removed."""
        referenced = {f for (f,) in self.db.execute("SELECT file FROM entries")}
        removed, now = 0, time.time()
        for p in self.objects.glob("*/*"):
            rel = f"{p.parent.name}/{p.name}"
            try:
                old = now - p.stat().st_mtime > min_age_s
            except FileNotFoundError:
                continue
            if old and rel not in referenced:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget the cached pages of every entry file (cold reads for benchmarks; Linux)."""
        for p in self.files():
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

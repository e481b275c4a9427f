"""kvforge.link.store: a content-addressed document KV store that a killed writer, two concurrent writers or a flipped
byte can never make serve a wrong entry."""

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kvforge import KVForgeError, get_press
from kvforge.link import prefill
from kvforge.link.docs import encode_document
from kvforge.link.store import DocumentStore
from kvforge.models import tiny_model

CHILD = Path(__file__).with_name("link_store_child.py")
DOCS = ["Mira keeps bees on the hill behind the mill, and counts the hives every spring.",
        "The miller's son helps her carry the frames to the market by the bridge."]


def tensors(doc) -> list[torch.Tensor]:
    return [t for layer in doc.layers for t in layer.tensors()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_roundtrip_compressed_and_reused_by_prefill(tmp_path, llama, smol_tokenizer):
    tok = smol_tokenizer
    store = DocumentStore(tmp_path / "s", llama, tok)
    doc = store.get_text(DOCS[0])
    assert len(store) == 1 and identical(tensors(store.lookup(doc.ids)), tensors(doc))
    # prefill through the store (cold, then warm) gives the logits of prefill without one
    _, plain = prefill(llama, tok, DOCS, " Who?", template=False)
    _, cold = prefill(llama, tok, DOCS, " Who?", template=False, store=store)
    _, warm = prefill(llama, tok, DOCS, " Who?", template=False, store=store)
    assert len(store) == 2 and torch.equal(cold, warm) and (plain - cold).abs().max() <= 1e-5
    # a press-compressed store keeps per-head budgets (slots, validity) exactly, under its own keys
    packed = DocumentStore(tmp_path / "s", llama, tok, press=get_press("adakv", compression_ratio=0.5))
    before = packed.stats()["bytes"]
    small = packed.get_text(DOCS[0])
    assert small.layers[0].valid is not None and len(packed) == 3
    assert packed.stats()["bytes"] - before < 0.7 * before / 2  # only the entries a head kept are written
    assert identical(tensors(packed.lookup(small.ids)), tensors(small))
    _, logits = prefill(llama, tok, DOCS, " Who?", template=False, store=packed)
    assert torch.isfinite(logits).all()


def test_flipped_byte_is_detected_and_reencoded(tmp_path, llama):
    store = DocumentStore(tmp_path, llama, None)
    ids = list(range(500, 540))
    doc = store.get(ids)
    (file,) = store.files()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert store.lookup(ids) is None
    assert len(store) == 0 and not file.exists()
    again = store.get(ids)  # encoded again and stored
    assert identical(tensors(again), tensors(doc)) and identical(tensors(store.lookup(ids)), tensors(doc))


def test_lru_limit_and_other_model(tmp_path, llama):
    one = encode_document(llama, list(range(600, 640)))
    store = DocumentStore(tmp_path, llama, None, max_bytes=int(2.5 * one.nbytes()))
    a, b = list(range(600, 640)), list(range(700, 740))
    store.get(a)
    store.get(b)
    store.lookup(a)  # a is now the most recently used
    store.get(list(range(800, 840)))
    assert store.lookup(a) is not None and store.lookup(b) is None and len(store) == 2
    assert len(list(store.objects.glob("*/*"))) == 2  # the evicted file is gone too
    with pytest.raises(KVForgeError, match="built for another model"):
        DocumentStore(tmp_path, tiny_model("llama", seed=1), None)


def _child(store: Path, refs: Path, n_docs: int, mode: str) -> subprocess.Popen:
    refs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(CHILD), str(store), str(refs), str(n_docs), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _refs(refs: Path) -> list[list[torch.Tensor]]:
    return [torch.load(p) for p in sorted(refs.glob("*.pt"))]


def test_killed_and_concurrent_writers(tmp_path, llama):
    """SIGKILL inside a write (after a chunk reached the temporary file) and between the rename and the index
    commit; two processes writing the same document at once. Afterwards every entry reads back bit-identical to
    what its writer encoded, or is absent — and nothing is reported, because nothing bad was ever indexed."""
    killed = {mode: _child(tmp_path / mode, tmp_path / f"refs-{mode}", 3, mode) for mode in ("write", "replace")}
    writers = [_child(tmp_path / "shared", tmp_path / f"refs-w{i}", 1, "slow") for i in range(2)]
    for mode, proc in killed.items():
        line = proc.stdout.readline()
        assert line.strip() == "STALLED", (mode, line, proc.stderr.read())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for proc in killed.values():
        proc.stdout.close()
        proc.stderr.close()
    for proc in writers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "DONE" in out, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad entry would warn: none may exist
        for mode in killed:
            store = DocumentStore(tmp_path / mode, llama, None)
            refs = _refs(tmp_path / f"refs-{mode}")
            ids = [list(range(1000 + 100 * k, 1040 + 100 * k)) for k in range(3)]
            for k in range(2):  # written before the kill: complete
                assert identical(tensors(store.lookup(ids[k])), refs[k]), (mode, k)
            assert store.lookup(ids[2]) is None and len(store) == 2, mode  # killed: absent
            assert store.gc(min_age_s=0) == 1  # the temporary file or the unindexed file
        shared = DocumentStore(tmp_path / "shared", llama, None)
        (ref0,), (ref1,) = _refs(tmp_path / "refs-w0"), _refs(tmp_path / "refs-w1")
        assert len(shared) == 1 and identical(tensors(shared.lookup(list(range(1000, 1040)))), ref0)
        assert identical(ref0, ref1) and shared.gc(min_age_s=0) == 0

"""A writer process for tests/test_link_store.py (not a test module).

    python link_store_child.py STORE REFS N_DOCS MODE

Encodes N_DOCS documents with the tiny llama and puts them into the DocumentStore at STORE, saving what it wrote
to REFS/<n>.pt first. MODE decides what happens while writing the *last* document:
- `write`: stall after its first chunk reached the temporary file (prints STALLED; the parent kills us there);
- `replace`: stall right after the file was renamed into place, before its index row is committed;
- `slow`: every chunk write sleeps a little (two writers of the same document then overlap), nothing stalls.
"""

import sys
import time

import torch

import kvforge.link.store as store_module
from kvforge.link.docs import encode_document
from kvforge.link.store import DocumentStore
from kvforge.models import tiny_model

path, refs, n_docs, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
real_os = store_module.os


class StallingOS:
    """`os` for the store module, stalling where MODE says (everything else is the real `os`)."""

    armed = False

    def __getattr__(self, name):
        return getattr(real_os, name)

    def write(self, fd, data):
        n = real_os.write(fd, data)
        if mode == "slow":
            time.sleep(0.02)
        if self.armed and mode == "write":
            print("STALLED", flush=True)
            time.sleep(600)
        return n

    def replace(self, src, dst):
        real_os.replace(src, dst)
        if self.armed and mode == "replace":
            print("STALLED", flush=True)
            time.sleep(600)


stalling = StallingOS()
store_module.os = stalling
store_module.CHUNK_BYTES = 4096  # an entry of ~40 tokens is ~10 chunks
model = tiny_model("llama")
store = DocumentStore(path, model, None)
for k in range(n_docs):
    ids = list(range(1000 + 100 * k, 1040 + 100 * k))
    doc = encode_document(model, ids)
    torch.save([t.clone() for layer in doc.layers for t in layer.tensors()], f"{refs}/{k}.pt")
    stalling.armed = k == n_docs - 1
    store.put(doc)
print("DONE", flush=True)

"""Document KV reuse with link tokens (KVLink): encode each document once, store its KV, and at request time
place cached documents side by side with exact RoPE re-rotation, optional trained link tokens, then the prompt."""

from kvforge.link.assemble import segment_mask
from kvforge.link.docs import DocKV, encode_document
from kvforge.link.reuse import generate, prefill
from kvforge.link.store import DocumentStore, MemoryStore
from kvforge.link.tokens import Links, add_links, load_links

__all__ = ["DocKV", "DocumentStore", "Links", "MemoryStore", "add_links", "encode_document", "generate", "load_links",
           "prefill", "segment_mask"]

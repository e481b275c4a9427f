"""Streaming past the cache size: StreamingLLM's sink + window cache (`sw`), window attention (`window`),
recomputation (`ar`) and KV-Align (`kv`), for endless generation and long-text perplexity. See docs/streaming.md."""

from kvforge.streaming.kvalign import KVAlign
from kvforge.streaming.layer import SinkWindowLayer
from kvforge.streaming.modes import AR, KV, MODES, SW, Window, make_mode, streaming_cache
from kvforge.streaming.runner import Stream

__all__ = ["AR", "KV", "MODES", "SW", "KVAlign", "SinkWindowLayer", "Stream", "Window", "make_mode",
           "streaming_cache"]

"""The registered `kvforge` attention function, its masks and backends."""

from kvforge.attention.function import (
    entry_mask,
    kvforge_attention,
    register,
    use_backend,
    use_kvforge_attention,
)

__all__ = ["entry_mask", "kvforge_attention", "register", "use_backend", "use_kvforge_attention"]

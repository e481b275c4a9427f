"""`KVSharingConfig`: a Llama config plus the layer map of cross-layer KV sharing."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from kvforge.sharing.layer_map import LayerMap

MODEL_TYPE = "kvforge_kv_sharing"
SHARED_KIND = "shared_source"  # the layer kind (kvforge.cache.plan) of a layer that stores no KV


@strict
class KVSharingConfig(LlamaConfig):
    r"""A Llama config whose layers may read other layers' KV (LCKV, CLA, YOCO, MixAttention).

    kv_layers (`str`, *optional*):
        The layer map in the reference's syntax: `_`-separated entries, entry i = the layer whose KV layer i attends
        to, a trailing `s` = sliding-window layer, e.g. `"0_20_20_…_20_21"`. Default: every layer its own
        (`"0_1_2_…"`, the dense model). Presets: `kvforge.sharing.preset(name, num_layers)`.
    forward_passes (`int`, *optional*, defaults to 7):
        Passes without gradient of the parallel iterative forward (`m` in the LCKV paper).
    backward_passes (`int`, *optional*, defaults to 2):
        Passes with gradient after them (`b`); the last pass gives the output.
    sliding_window (`int`, *optional*, defaults to 4096):
        Window of the layers marked `s` (keys in `(t - window, t]` for query t).
    use_sequential (`bool`, *optional*, defaults to False):
        Always run token by token (the definition); otherwise only prompts of at most m + b tokens do.
    """

    model_type = MODEL_TYPE

    kv_layers: str | None = None
    forward_passes: int = 7
    backward_passes: int = 2
    sliding_window: int | None = 4096
    use_sequential: bool = False

    def __post_init__(self, **kwargs):
        if self.kv_layers is None:
            self.kv_layers = "_".join(map(str, range(self.num_hidden_layers)))
        super().__post_init__(**kwargs)
        LayerMap.parse(self.kv_layers, self.num_hidden_layers)  # a bad map: a one-line KVForgeError right away

    @property
    def layer_map(self) -> LayerMap:
        return LayerMap.parse(self.kv_layers, self.num_hidden_layers)

    @property
    def kvforge_layer_plan(self) -> list[str]:
        """The cache layer kind of each layer (kvforge.cache.plan): producers store their KV (a window of it when
        marked sliding), every other layer is a shared-source layer that stores nothing."""
        lm = self.layer_map
        producers = set(lm.producers)
        return [SHARED_KIND if i not in producers else "sliding_attention" if lm.sliding[i] else "full_attention"
                for i in range(len(lm))]

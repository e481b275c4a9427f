"""Cross-layer KV sharing (LCKV, CLA, YOCO, MixAttention): a layer-map config, a Llama model class registered
with the Auto classes (importing this package registers it), presets, conversion from a Llama checkpoint and
continued training. See docs/sharing.md."""

from kvforge.sharing.configuration import MODEL_TYPE, KVSharingConfig
from kvforge.sharing.convert import convert, preset_maps, random_sharing_model, sharing_config
from kvforge.sharing.layer_map import PRESETS, LayerMap, preset
from kvforge.sharing.modeling import KVSharingForCausalLM, KVSharingModel, SharedSourceLayer
from kvforge.sharing.train import perplexity, train

__all__ = ["MODEL_TYPE", "PRESETS", "KVSharingConfig", "KVSharingForCausalLM", "KVSharingModel", "LayerMap",
           "SharedSourceLayer", "convert", "perplexity", "preset", "preset_maps", "random_sharing_model",
           "sharing_config", "train"]

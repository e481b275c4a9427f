"""Cross-layer KV sharing on Llama (LCKV, CLA, YOCO, MixAttention), in the transformers one-file style.

Layer i attends to the KV of layer `sources[i]` (`KVSharingConfig.kv_layers`). Only *producers* (layers some
layer reads) have k/v projections and a cache layer; every other layer's cache layer is a `SharedSourceLayer`,
which stores nothing. A layer reading a *higher* layer (upward) sees only strictly earlier tokens of it.

The definition is sequential: token t runs through the layers in order, each upward layer reading the producer's
KV of tokens < t. Forward modes (all exact but the first with too few passes):
- parallel (training, prompts): the layers of each cyclic range (`LayerMap.segments`) run `num_iterations`
  times over the whole sequence, the upward reads using the KV of the previous pass (zeros at first); after p
  passes tokens 0..p-1 are exact. Gradient flows through the last `backward_passes` passes only.
- sequential: token by token through the cache (`sequential=True`, `config.use_sequential`, or automatically
  for prompts of at most m + b tokens in a model with upward layers).
- decoding (one token): upward layers read the producer's cached KV of earlier tokens; exact in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin
from transformers.cache_utils import Cache, DummyLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from kvforge.cache import DenseLayer, KVCache, register_layer_kind
from kvforge.errors import KVForgeError
from kvforge.sharing.configuration import MODEL_TYPE, SHARED_KIND, KVSharingConfig
from kvforge.sharing.layer_map import LayerMap


class SharedSourceLayer(DummyLayer):
    """Cache layer of a layer that reads another layer's KV (`source`): stores nothing, counts 0 bytes in
    `KVCache.stats()`. Not a CacheLayerMixin, so `Cache.get_seq_length()` asks the first producing layer."""

    compressible = False

    def __init__(self, source: int):
        super().__init__()
        self.source = source
        self.cumulative_length = 0  # recorded by KVCache.snapshot()/restore() for non-dense layers; unused


register_layer_kind(SHARED_KIND, lambda cfg, i, reserve: SharedSourceLayer(cfg.layer_map.sources[i]))


@dataclass
class KVView:
    """KV entries a layer attends to: keys `[B, H_kv, n, D]`, values `[B, H_kv, n, Dv]`, the logical slot (token
    position in the cache) of each entry `[1 | B, 1 | H_kv, n]`, validity `[B, H_kv, n]` or None (all valid), and
    `first`, the first slot of contiguous entries (slots first..first+n-1), else None."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor | None = None
    first: int | None = None

    @classmethod
    def new(cls, keys: torch.Tensor, values: torch.Tensor, start: int) -> KVView:
        """Entries of q new tokens at slots start..start+q-1."""
        return cls(keys, values, torch.arange(start, start + keys.shape[2], device=keys.device)[None, None],
                   first=start)

    def cat(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> KVView:
        """These entries followed by q new tokens at slots start..start+q-1."""
        b, h, q = self.slots.shape[0], self.slots.shape[1], keys.shape[2]
        new = torch.arange(start, start + q, device=keys.device).expand(b, h, q)
        valid = None if self.valid is None else torch.cat([self.valid, self.valid.new_ones(*self.valid.shape[:2], q)],
                                                          -1)
        return KVView(torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2),
                      torch.cat([self.slots, new], -1), valid, self.first)


def stored_view(layer) -> KVView | None:
    """What a producer's cache layer holds (None when empty): a kvforge layer's entries (pruned or not), or the
    window of transformers' sliding layer (its last n tokens)."""
    if layer is None or not layer.is_initialized or layer.get_seq_length() == 0:
        return None
    if isinstance(layer, DenseLayer):
        keys, values = layer.kv()
        slots = layer.entry_slots()
        if slots is None:
            return KVView(keys, values, torch.arange(keys.shape[2], device=keys.device)[None, None], first=0)
        return KVView(keys, values, slots, layer.entry_valid())
    n = layer.keys.shape[2]
    return KVView.new(layer.keys, layer.values, layer.get_seq_length() - n)


class SharedKV:
    """The KV of every producing layer during one forward of q new tokens after `start` cached ones.

    `past[j]`: what layer j's cache held before this forward (dropped once j has written the cache). `new[j]`: j's KV
    of the new tokens from the latest pass before the final one (`[B, H_kv, q, D]`). `estimate[j]`: what upward
    layers read for the new tokens of j (the previous pass's `new[j]`, zeros before the first pass). `fresh[j]`:
    past + new, what layers at or above j read. In the final pass (`final`), producers append their new KV to the
    cache. `pad [B, start + q]` (True = real token) or None.
    """

    def __init__(self, config: KVSharingConfig, layer_map: LayerMap, cache: KVCache | None, start: int, q: int,
                 pad: torch.Tensor | None):
        self.map = layer_map
        self.window = config.sliding_window
        self.cache, self.start, self.q, self.pad = cache, start, q, pad
        self.past = {j: stored_view(cache.layers[j]) if cache is not None else None for j in self.map.producers}
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.estimate: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: dict[int, KVView] = {}
        self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict[tuple, torch.Tensor | None] = {}
        self.final = True

    def produce(self, j: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Layer j computed its KV of the new tokens (post-RoPE keys `[B, H_kv, q, D]`)."""
        if not self.final:  # the next pass's estimate; after the final pass nothing reads it
            self.new[j] = (keys, values)
        past = self.past[j]
        if not (self.final and self.cache is not None):
            self.fresh[j] = past.cat(keys, values, self.start) if past is not None else KVView.new(keys, values,
                                                                                                  self.start)
            return
        layer = self.cache.layers[j]
        # Nothing reads past[j] after j's final write (upward readers of j run before j), and it views the buffers
        # the update may replace (a DenseLayer growing, a sliding layer's concatenation): let them go now, or every
        # producer's old buffers stay alive until the forward ends (~1.65x the KV at the chunk that grows the cache).
        self.past[j] = None
        self.returned[j] = self.cache.update(keys, values, j)
        if isinstance(layer, DenseLayer):
            self.fresh[j] = stored_view(layer)
        else:  # transformers' sliding layer returns its window + the new tokens but keeps only the window
            k, v = self.returned[j]
            self.fresh[j] = KVView.new(k, v, self.start + self.q - k.shape[2])

    def read(self, i: int) -> tuple[KVView | None, tuple]:
        """The entries layer i attends to and the key of its mask (None: nothing to attend)."""
        j, sliding = self.map.sources[i], self.map.sliding[i]
        if self.map.upward(i):
            past = self.past[j]
            if self.q == 1:  # decoding: the new token's own KV is masked anyway
                return past, (j, "past", sliding)
            k, v = self.estimate[j]
            view = past.cat(k, v, self.start) if past is not None else KVView.new(k, v, self.start)
            return view, (j, "upward", sliding)
        if j == i and j in self.returned and isinstance(self.cache.layers[j], DenseLayer):
            # the producer's own attention: the tensors the cache returned, so kvforge's attention function finds the
            # layer (presses act there) and maps this logical mask onto the stored entries itself
            k, v = self.returned[j]
            slots = torch.arange(self.start + self.q, device=k.device)[None, None]
            return KVView(k, v, slots, first=0), (j, "logical", sliding)
        return self.fresh[j], (j, "fresh", sliding)

    def mask(self, view: KVView, key: tuple, upward: bool, sliding: bool) -> torch.Tensor | None:
        """Bool mask `[1 | B, 1 | H_kv, q, n]` (True = attend), or None when every entry is visible to the one
        query. Key slot s is visible to query slot t when s <= t (s < t for upward layers), t - window < s for
        sliding layers, s is not padding and the entry is valid. Built once per forward for each key."""
        if key not in self.masks:
            self.masks[key] = self._build_mask(view, upward, sliding)
        return self.masks[key]

    def _build_mask(self, view: KVView, upward: bool, sliding: bool) -> torch.Tensor | None:
        inside = not sliding or (view.first is not None and view.first > self.start - self.window)
        if self.q == 1 and self.pad is None and view.valid is None and inside:
            return None  # decoding, every stored entry in the past and in the window: no mask (fast SDPA paths)
        s = view.slots[:, :, None, :]
        t = torch.arange(self.start, self.start + self.q, device=s.device)[None, None, :, None]
        m = s < t if upward else s <= t
        if sliding:
            m = m & (s > t - self.window)
        if self.pad is not None:
            b, h, n = self.pad.shape[0], view.slots.shape[1], view.slots.shape[2]
            real = self.pad[:, None, :].expand(b, h, self.pad.shape[1]).gather(2, view.slots.expand(b, h, n))
            m = m & real[:, :, None, :]
        if view.valid is not None:
            m = m & view.valid[:, :, None, :]
        return m


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, H, q, D]` by the position embeddings `cos/sin [B, q, D]`."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVSharingAttention(nn.Module):
    """Llama attention whose keys/values may come from another layer; k/v projections only on producing layers."""

    def __init__(self, config: KVSharingConfig, layer_idx: int):
        super().__init__()
        lm = config.layer_map
        self.config = config
        self.layer_idx = layer_idx
        self.source = lm.sources[layer_idx]
        self.upward = lm.upward(layer_idx)
        self.is_sliding = lm.sliding[layer_idx]
        self.produces = layer_idx in lm.producers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hq, hkv, bias = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim, \
            config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, hq, bias=bias)
        if self.produces:
            self.k_proj = nn.Linear(config.hidden_size, hkv, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, hkv, bias=bias)
        self.o_proj = nn.Linear(hq, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                shared_kv: SharedKV) -> torch.Tensor:
        """`hidden_states [B, q, hidden]` -> `[B, q, hidden]`."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query = _rope(self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
        if self.produces:
            keys = _rope(self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
            values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            shared_kv.produce(self.layer_idx, keys, values)
        view, key = shared_kv.read(self.layer_idx)
        if view is None:  # an upward layer at the very first token: nothing earlier to attend to
            out = query.new_zeros(*input_shape, query.shape[1], self.head_dim)
        else:
            mask = shared_kv.mask(view, key, self.upward, self.is_sliding)
            out = self._attend(query, view, mask, empty_rows=self.upward or shared_kv.pad is not None)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())

    def _attend(self, query: torch.Tensor, view: KVView, mask: torch.Tensor | None, empty_rows: bool) -> torch.Tensor:
        """Attention of `query [B, Hq, q, D]` over the view through the configured implementation; `[B, q, Hq, Dv]`.
        Rows with nothing visible give zeros (whatever the implementation does with them)."""
        impl = self.config._attn_implementation
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        arg = mask
        if mask is not None and impl == "eager":  # transformers' eager attention adds a float mask
            arg = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        out, _ = interface(self, query, view.keys, view.values, arg,
                           dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling)
        if mask is not None and empty_rows:
            empty = ~mask.any(-1)  # [b, h, q]
            if empty.shape[1] > 1:
                empty = empty.repeat_interleave(self.num_key_value_groups, dim=1)
            out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
        return out


class KVSharingDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: KVSharingConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = KVSharingAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                shared_kv: SharedKV) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, shared_kv)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class KVSharingPreTrainedModel(PreTrainedModel):
    config: KVSharingConfig
    config_class = KVSharingConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["KVSharingDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class KVSharingModel(KVSharingPreTrainedModel):
    def __init__(self, config: KVSharingConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([KVSharingDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.layer_map = config.layer_map
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_iterations: int | None = None,
        sequential: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        num_iterations (`int`, *optional*):
            Passes of the parallel forward over each cyclic layer range (default `forward_passes + backward_passes`);
            exact once it is at least the number of new tokens.
        sequential (`bool`, *optional*):
            Run token by token (the definition). Default: `config.use_sequential`, or automatically for at most
            m + b new tokens when some layer reads a higher one.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self.prepare_cache(past_key_values, use_cache)
        b, q = inputs_embeds.shape[:2]
        start = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + q, device=inputs_embeds.device)[None]
        pad = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != start + q:
                raise KVForgeError(f"attention_mask must be 2-D [batch, cached + new tokens] = [{b}, {start + q}]; "
                                   f"got {list(attention_mask.shape)}")
            pad = None if bool(attention_mask.all()) else attention_mask.bool()
        passes = self.config.forward_passes + self.config.backward_passes
        n_iter = passes if num_iterations is None else num_iterations
        if n_iter < 1:
            raise KVForgeError(f"num_iterations={n_iter}; it must be at least 1")
        if sequential is None:
            sequential = self.config.use_sequential or (self.layer_map.has_upward and q <= passes)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        if not sequential or q == 1:
            hidden = self.run_layers(inputs_embeds, position_embeddings, cache, start, pad, n_iter)
        else:
            step_cache = cache if cache is not None else KVCache(self.config)
            cos, sin = position_embeddings
            hidden = torch.cat([
                self.run_layers(inputs_embeds[:, t : t + 1], (cos[:, t : t + 1], sin[:, t : t + 1]), step_cache,
                                start + t, None if pad is None else pad[:, : start + t + 1], 1)
                for t in range(q)], dim=1)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=cache)

    def prepare_cache(self, past_key_values: Cache | None, use_cache: bool) -> KVCache | None:
        """The KVCache this forward uses. transformers' `generate` hands an empty DynamicCache (it does not know
        the shared layers): it is replaced by a KVCache built from the model's layer plan (the output carries it)."""
        if past_key_values is None:
            return KVCache(self.config) if use_cache else None
        if not isinstance(past_key_values, KVCache):
            if past_key_values.get_seq_length() == 0:
                return KVCache(self.config)
            raise KVForgeError(f"a {type(past_key_values).__name__} with entries cannot serve a shared-KV model; "
                               "use kvforge.KVCache(model)")
        if past_key_values.plan != self.config.kvforge_layer_plan:
            raise KVForgeError("the KVCache was built for another layer plan; build it from this model: "
                               "kvforge.KVCache(model)")
        press = past_key_values.press
        if press is not None:
            if getattr(press, "acts_while_decoding", False):
                raise KVForgeError(f"press {getattr(press, 'name', press)!r} acts while decoding, which a shared-KV "
                                   "model does not support (layers reading a producer would miss its selection); "
                                   "use a prefill press")
            if getattr(press, "has_extra_pass", False):
                raise KVForgeError(f"press {getattr(press, 'name', press)!r} runs extra passes over the context, "
                                   "which a shared-KV model does not support; use a single-pass prefill press")
            lm = self.layer_map
            blind = [j for j in past_key_values.compressible_layers() if lm.sources[j] != j]
            if blind:
                raise KVForgeError(f"a press cannot apply to layer {blind[0]}: its KV is read only by other layers "
                                   "(presses act inside a producing layer's own attention)")
        return past_key_values

    def run_layers(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   cache: KVCache | None, start: int, pad: torch.Tensor | None, n_iter: int) -> torch.Tensor:
        """All layers over the q new tokens `hidden [B, q, hidden]` (slots start..start+q-1) -> `[B, q, hidden]`.

        Cyclic layer ranges run `n_iter` passes from zero KV for their upward targets (one pass when q == 1, which
        is exact); gradient flows through the last `backward_passes` passes; only the last writes the cache."""
        q = hidden.shape[1]
        lm = self.layer_map
        state = SharedKV(self.config, lm, cache, start, q, pad)
        grad = torch.is_grad_enabled()
        n_iter = 1 if q == 1 else n_iter
        for a, b, cyclic in lm.segments():
            if not cyclic:
                state.final = True
                for layer in self.layers[a:b]:
                    hidden = layer(hidden, position_embeddings, state)
                continue
            kv_shape = (hidden.shape[0], self.config.num_key_value_heads, q, self.layers[a].self_attn.head_dim)
            targets = {lm.sources[i] for i in range(a, b) if lm.upward(i)}
            zeros = hidden.new_zeros(kv_shape)
            state.estimate = {j: (zeros, zeros) for j in targets}
            inputs = hidden
            for p in range(n_iter):
                state.final = p == n_iter - 1
                with torch.set_grad_enabled(grad and p >= n_iter - self.config.backward_passes):
                    hidden = inputs
                    for layer in self.layers[a:b]:
                        hidden = layer(hidden, position_embeddings, state)
                if not state.final:
                    state.estimate.update({j: state.new[j] for j in targets})
        return hidden


class KVSharingForCausalLM(KVSharingPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KVSharingConfig):
        super().__init__(config)
        self.model = KVSharingModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_iterations: int | None = None,
        sequential: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As `LlamaForCausalLM.forward`, plus `num_iterations` and `sequential` (see `KVSharingModel.forward`)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             num_iterations=num_iterations, sequential=sequential)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


AutoConfig.register(MODEL_TYPE, KVSharingConfig)
AutoModel.register(KVSharingConfig, KVSharingModel)
AutoModelForCausalLM.register(KVSharingConfig, KVSharingForCausalLM)

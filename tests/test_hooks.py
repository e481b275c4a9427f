"""Press hooks and flags, wrapper specs and option checks.

Hooks (`after_prefill`, `on_decode`, `select`) are declared on `Press` with no-op defaults and called
unconditionally; the flags `acts_while_decoding` / `has_extra_pass` decide engine paths. Wrappers name their inner
press `press`, spelled `name:inner` in specs, and `press_spec` writes a built press back as a spec."""

from __future__ import annotations

import ast
import math
import pathlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from kvforge import KVCache
from kvforge.cache.graphs import GraphDecoder
from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_choice, check_float, check_int
from kvforge.presses.registry import PRESSES, get_press, parse_press, press_spec, scorer_names, wrapper_names

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "kvforge"
HOOK_NAMES = {"on_decode", "select", "after_prefill", "padded", "score"}
ACTS_WHILE_DECODING = {"decoding", "h2o", "quest", "scissorhands", "tova_decode"}
EXTRA_PASS = {"kvzip"}


def build(name: str) -> Press:
    return get_press(name, presses=["snapkv"]) if name == "composed" else get_press(name)


def one_layer_cache(press: Press | None, n: int = 6, h: int = 1, d: int = 4) -> KVCache:
    """A KVCache of one compressible layer holding `n` entries (no model needed)."""
    cache = KVCache(SimpleNamespace(model_type="llama", num_hidden_layers=1, sliding_window=None, layer_types=None),
                    press=press, reserve=8)
    keys = torch.randn(1, h, n, d)
    cache.layers[0].update(keys, keys.clone())
    cache.armed = False
    return cache


def context(cache: KVCache) -> LayerContext:
    return LayerContext(None, cache, 0, torch.randn(1, 1, 1, 4), None, 1.0)


# -- (a) flags of every registered press -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESSES))
def test_flags_match_what_each_press_does(name):
    press = build(name)
    assert press.acts_while_decoding == (name in ACTS_WHILE_DECODING)
    assert press.has_extra_pass == (name in EXTRA_PASS)
    # the declared kind and table row agree with the flags
    assert press.acts_while_decoding == (type(press).kind in ("decode", "selection"))
    if name != "composed":
        assert press.has_extra_pass == (type(press).extra_passes != "0")
    if not press.acts_while_decoding:  # the base no-ops: they never read the context
        assert press.on_decode(None) is None and press.select(None) is None
    if not press.has_extra_pass:
        assert press.after_prefill(None, None, None) is None
    # what the engine decides from the flags: graph decoding only when no press acts while decoding
    why = GraphDecoder.unsupported(one_layer_cache(press))
    assert (why is not None and name in why) == press.acts_while_decoding


def test_flags_follow_the_overridden_hook():
    @dataclass
    class Selects(Press):
        def select(self, ctx):
            return None

    @dataclass
    class Passes(Press):
        def after_prefill(self, model, cache, enc):
            pass

    assert Selects().acts_while_decoding and not Selects().has_extra_pass
    assert Passes().has_extra_pass and not Passes().acts_while_decoding
    assert not Press().acts_while_decoding and not Press().has_extra_pass


# -- (b) composed ------------------------------------------------------------------------------------------------
@dataclass
class Logged(Press):
    """Records its hook calls in a shared log; `keep` (a list of bools) is its `select` answer."""

    tag: str = ""
    log: list = field(default_factory=list)
    keep: list | None = None

    def compress(self, ctx):
        self.log.append((self.tag, "compress"))

    def after_prefill(self, model, cache, enc):
        self.log.append((self.tag, "after_prefill"))

    def on_decode(self, ctx):
        self.log.append((self.tag, "on_decode", id(ctx)))

    def select(self, ctx):
        self.log.append((self.tag, "select"))
        return None if self.keep is None else torch.tensor(self.keep)[None, None]


@dataclass
class PrefillOnly(Press):
    tag: str = ""
    log: list = field(default_factory=list)

    def compress(self, ctx):
        self.log.append((self.tag, "compress"))


def test_composed_of_a_prefill_and_a_decode_press_acts_while_decoding():
    assert get_press("composed", presses=["snapkv", "h2o"]).acts_while_decoding
    assert get_press("composed", presses=["snapkv", "kvzip"]).has_extra_pass
    assert not get_press("composed", presses=["snapkv", "kivi"]).acts_while_decoding
    log = []
    press = get_press("composed", presses=[PrefillOnly(tag="p", log=log), Logged(tag="d", log=log)])
    assert press.acts_while_decoding and press.has_extra_pass
    assert GraphDecoder.unsupported(one_layer_cache(press)) is not None
    ctx = context(one_layer_cache(press))
    press.after_prefill(None, None, None)
    press.on_decode(ctx)
    assert press.select(ctx) is None
    assert [e[:2] for e in log] == [("d", "after_prefill"), ("d", "on_decode"), ("d", "select")]
    assert log[1][2] == id(ctx)  # the first press that acts gets the engine's context


def test_composed_calls_every_hook_in_order():
    log = []
    a = Logged(tag="a", log=log, keep=[True, True, False, True, False, True])
    b = Logged(tag="b", log=log, keep=[True, False, True, True, False, True])
    press = get_press("composed", presses=[a, b])
    ctx = context(one_layer_cache(press))
    press.after_prefill(None, None, None)
    press.on_decode(ctx)
    chosen = press.select(ctx)
    assert [e[:2] for e in log] == [("a", "after_prefill"), ("b", "after_prefill"), ("a", "on_decode"),
                                    ("b", "on_decode"), ("a", "select"), ("b", "select")]
    assert log[2][2] == id(ctx) and log[3][2] != id(ctx)  # b sees a fresh context after a acted
    assert chosen[0, 0].tolist() == [True, False, False, True, False, True]  # entries both chose


# -- (c) wrapper specs -------------------------------------------------------------------------------------------
SCORERS = ["snapkv", "knorm", "tova", "expected_attention"]


def test_every_wrapper_names_its_inner_press_press():
    assert set(wrapper_names()) >= {"adakv", "cam", "chunk", "decoding", "merge"}
    for name in wrapper_names():
        assert isinstance(get_press(name).press, Press)
        with pytest.raises(KVForgeError, match="no option 'scorer'"):
            get_press(name, scorer="knorm")


@pytest.mark.parametrize("wrapper", sorted({"adakv", "cam", "chunk", "decoding", "merge"} | set(wrapper_names())))
@pytest.mark.parametrize("inner", SCORERS)
def test_wrapper_inner_specs_parse_and_round_trip(wrapper, inner):
    press = parse_press(f"{wrapper}:{inner}")(0.25)
    assert press.name == wrapper and press.press == get_press(inner)
    spec = press_spec(press)
    assert spec.startswith(f"{wrapper}:{inner}")
    assert parse_press(spec)(0.25) == press


@pytest.mark.parametrize("spec", [
    "adakv:knorm@alpha_safeguard=0.5",
    "cam:snapkv@merge_budget=4@window_size=8",
    "chunk:knorm@chunk_length=64",
    "decoding:snapkv@compression_interval=8@query_buffer_size=16",
    "merge:streamingllm@method=weighted@merge_keys=False",
    "kvmerger@sigma=0.5",
    "expected_attention@use_covariance=False@stat_window=None",
    "snapkv@window_size=16+kivi@bits=4",
    "headkv@pool=global",
])
def test_specs_with_options_round_trip(spec):
    press = parse_press(spec)(0.5)
    assert parse_press(press_spec(press))(0.5) == press
    assert press_spec(parse_press(press_spec(press))(0.5)) == press_spec(press)


@pytest.mark.parametrize("name", sorted(set(PRESSES) - {"composed"}))
def test_every_press_with_defaults_round_trips(name):
    press = get_press(name)
    assert parse_press(press_spec(press))(press.compression_ratio) == press


def test_specs_that_cannot_be_written_or_read():
    with pytest.raises(KVForgeError, match="snapkv wraps no press.*adakv"):
        parse_press("snapkv:knorm")
    with pytest.raises(KVForgeError) as e:
        parse_press("adakv:h2o")
    assert "press='h2o'" in str(e.value) and all(s in str(e.value) for s in scorer_names())
    with pytest.raises(KVForgeError, match="options of its own"):
        press_spec(get_press("adakv", press=get_press("snapkv", window_size=8)))
    for path in ("scores@1.json", "4"):  # would split the spec / read back as a number
        with pytest.raises(KVForgeError, match="cannot be written"):
            press_spec(get_press("kvzip", head_scores_path=path))


# -- (d) no probing of hooks -------------------------------------------------------------------------------------
def hook_probes(source: str) -> list[int]:
    """Lines of `hasattr(x, "<hook>")` / `getattr(x, "<hook>", ...)` calls in `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in HOOK_NAMES):
            lines.append(node.lineno)
    return lines


def test_hook_probes_are_found():
    assert hook_probes('if hasattr(press, "on_decode"):\n    pass\nf = getattr(p, "select", None)\n') == [1, 3]
    assert hook_probes('hasattr(config, "get_text_config")\nhasattr(p, name)\n') == []


def test_no_press_hook_is_probed_in_the_package():
    found = [f"{path.relative_to(SRC)}:{line}" for path in sorted(SRC.rglob("*.py"))
             for line in hook_probes(path.read_text(encoding="utf-8"))]
    assert found == [], f"call the hook (no-op default) or read a flag instead: {found}"


# -- (e) option checks -------------------------------------------------------------------------------------------
DEMO = SimpleNamespace(name="demo")


@pytest.mark.parametrize("check, args, kwargs, fragments", [
    (check_int, ("n", 0), {}, ["demo: n=0", "an integer >= 1"]),
    (check_int, ("n", True), {}, ["n=True", "an integer >= 1"]),
    (check_int, ("n", 2.0), {}, ["n=2.0", "an integer >= 1"]),
    (check_int, ("n", 40, 1, 32), {}, ["n=40", "an integer in [1, 32]"]),
    (check_int, ("n", -1), {"minimum": 0, "optional": True}, ["n=-1", "None or an integer >= 0"]),
    (check_float, ("r", 1.0, 0, 1), {"high_open": True}, ["demo: r=1.0", "a number in [0, 1)"]),
    (check_float, ("r", math.nan, 0, 1), {}, ["r=nan", "a number in [0, 1]"]),
    (check_float, ("r", "0.5", 0, 1), {}, ["r='0.5'", "a number in [0, 1]"]),
    (check_float, ("s", 0), {"low": 0, "low_open": True, "hint": "a width"}, ["s=0", "a number > 0 (a width)"]),
    (check_choice, ("mode", "x", ("evict", "retain")), {}, ["demo: mode='x'", "allowed: evict, retain"]),
])
def test_checks_reject_bad_values(check, args, kwargs, fragments):
    with pytest.raises(KVForgeError) as e:
        check(DEMO, *args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_checks_accept_good_values():
    check_int(DEMO, "n", 1)
    check_int(DEMO, "n", None, optional=True)
    check_float(DEMO, "r", 0, 0, 1, high_open=True)
    check_float(DEMO, "s", None, low=0, low_open=True, optional=True)
    check_choice(DEMO, "mode", "evict", ("evict", "retain"))


@pytest.mark.parametrize("name, options, fragments", [
    ("snapkv", {"window_size": 0}, ["snapkv: window_size=0", ">= 1"]),
    ("snapkv", {"kernel_size": 4}, ["kernel_size=4", "odd"]),
    ("adakv", {"alpha_safeguard": 1.5}, ["adakv: alpha_safeguard=1.5", "[0, 1]"]),
    ("gear", {"outlier_ratio": 1.0}, ["gear: outlier_ratio=1.0", "[0, 1)"]),
    ("nacl", {"proxy_ratio": 0.0}, ["nacl: proxy_ratio=0.0", "(0, 1)"]),
    ("kvmerger", {"sigma": 0}, ["kvmerger: sigma=0", "> 0", "adaptive"]),
    ("scissorhands", {"history_window": 99}, ["history_window=99", "[1, 62]"]),
    ("kvzip", {"mode": "x"}, ["kvzip: mode='x'", "evict", "retain"]),
    ("decoding", {"target_size": 0}, ["decoding: target_size=0", ">= 1"]),
    ("knorm", {"compression_ratio": 1.0}, ["compression_ratio=1.0", "[0, 1)"]),
    ("pyramidkv", {"window_size": 0}, ["pyramidkv: window_size=0"]),
    ("kvquant", {"outlier_ratio": -0.1}, ["kvquant: outlier_ratio=-0.1", "[0, 1)"]),
])
def test_presses_report_bad_options(name, options, fragments):
    with pytest.raises(KVForgeError) as e:
        get_press(name, **options)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg

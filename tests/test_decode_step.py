"""The one-token decode step (edge_runtime.decode_step) against the engine's general loop: the same logits and the
same cache, to the bit, whichever way each layer's attention goes."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime import attention, attention_kernel, decode_step
from edge_runtime.attention import DecodeAttention
from edge_runtime.model_spec import FULL

TOKENS = 300  # past the full layers' first growth (kv_cache.GROWTH) and many times round the sliding rings


def _counted(monkeypatch, owner, name: str) -> list[int]:
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _decode_both_ways(artifact, **options) -> None:
    fast, general = edge_runtime.load(artifact, **options), edge_runtime.load(artifact, **options)
    general.engine.decode = None
    ids = np.random.default_rng(0).integers(4, fast.spec.input_vocab_size, size=TOKENS)
    for model in (fast, general):
        model.engine.reset()
    assert np.array_equal(fast.engine.forward(ids[:3], True), general.engine.forward(ids[:3], True))
    for token in ids[3:]:
        assert np.array_equal(fast.engine.forward(np.array([token]), False),
                              general.engine.forward(np.array([token]), False))
    assert fast.engine.tokens == general.engine.tokens == ids.tolist()
    for layer, store in fast.engine.cache.stores.items():
        other = general.engine.cache.stores[layer]
        for mine, theirs in zip((*store.keys, *store.values, *store.recent_keys, *store.recent_values),
                                (*other.keys, *other.values, *other.recent_keys, *other.recent_values)):
            assert all(np.array_equal(mine.data[name], theirs.data[name]) for name in mine.data)


@pytest.mark.parametrize("name, options", [
    ("shared-mqa-wide", dict(kv="fp16")),  # fp16 full layers (a coded block), fp32 sliding rings (exact)
    ("shared-mqa-wide", dict(kv="tq3.5", kv_recent=4, kv_sliding="int8", threads=2)),  # two coded kinds, a ring
    ("shared-gqa", dict(kv="int8", kv_recent=4, threads=1)),  # two KV heads, each its own call
    ("shared-gqa", dict(kv="fp16", threads=2)),  # two KV heads, too short for the pool: both on this thread
    ("3n-causal", dict(kv="fp16")),  # Gemma 3n's graphs (AltUp, Laurel) through the same contract
])
def test_the_decode_step_runs_the_kernel_as_the_general_loop_does(name, options, artifacts, monkeypatch):
    if attention_kernel.load() is None:
        pytest.skip("no attention kernel built for this machine")
    calls = _counted(monkeypatch, DecodeAttention, "__call__")
    fallbacks = _counted(monkeypatch, decode_step, "attend")
    _decode_both_ways(artifacts[name], **options)
    layers = edge_runtime.load(artifacts[name]).spec.num_hidden_layers
    assert (len(calls), len(fallbacks)) == ((TOKENS - 3) * layers, 0)


@pytest.mark.parametrize("name, dim, full_layers, kv_heads", [("shared-mqa-wide", 32, 2, 1),
                                                                ("shared-gqa", 48, 3, 2)])
def test_a_store_long_enough_to_split_is_shared_between_threads_as_attend_shares_it(name, dim, full_layers, kv_heads,
                                                                                    artifacts, monkeypatch):
    """Past two least shares the step cuts a store where `attend` cuts it, hands the shares after the first to the
    pool and merges: the same logits to the bit. The cuts move in steps of the quantum (5 rows here), and only then
    are the calls built again, not at every step."""
    if attention_kernel.load() is None:
        pytest.skip("no attention kernel built for this machine")
    monkeypatch.setattr(attention, "KERNEL_MIN_SHARE_VALUES", 2 * dim * 40)  # full layers: 80 rows split
    calls = _counted(monkeypatch, DecodeAttention, "__call__")
    builds = _counted(monkeypatch, DecodeAttention, "_prepare")
    fallbacks = _counted(monkeypatch, decode_step, "attend")
    split = _counted(monkeypatch, attention_kernel.Merge, "__call__")
    _decode_both_ways(artifacts[name], kv="fp16", threads=2)
    layers = edge_runtime.load(artifacts[name]).spec.num_hidden_layers
    assert (len(calls), len(fallbacks)) == ((TOKENS - 3) * layers, 0)
    # both engines merged every split head's shares, from the step after the store reached 80 rows
    assert len(split) == 2 * (TOKENS - 80) * full_layers * kv_heads
    assert len(builds) < full_layers * (TOKENS - 80) / 4


@pytest.mark.parametrize("least_rows, pooled_from", [(None, None), (100, 100)])
def test_whole_heads_go_to_the_pool_only_once_a_head_is_worth_a_thread(least_rows, pooled_from, artifacts,
                                                                          monkeypatch):
    """Two KV heads of a short store run on the calling thread: a handoff costs more than a head's call (E4B at depth
    16, 2 threads: 5.5-9.8 ms of a 135 ms step in 42 layers' handoffs). From `least` rows on (KERNEL_MIN_SHARE_VALUES),
    the second head goes to the pool, at every full layer of both engines' steps; the sliding rings (6 rows) never."""
    if attention_kernel.load() is None:
        pytest.skip("no attention kernel built for this machine")
    if least_rows:
        monkeypatch.setattr(attention, "KERNEL_MIN_SHARE_VALUES", 2 * 48 * least_rows)
    pooled = _counted(monkeypatch, attention.Workers, "run")
    _decode_both_ways(artifacts["shared-gqa"], kv="fp16", threads=2)
    full_layers = 3
    assert len(pooled) == (0 if pooled_from is None else 2 * full_layers * (TOKENS - pooled_from))


def test_without_the_kernel_the_decode_step_attends_in_numpy(artifacts, monkeypatch):
    monkeypatch.setattr(attention_kernel, "load", lambda: None)
    calls = _counted(monkeypatch, DecodeAttention, "__call__")
    fallbacks = _counted(monkeypatch, decode_step, "attend")
    _decode_both_ways(artifacts["shared-mqa-wide"], kv="tq3.5", kv_recent=4)
    assert (len(calls), len(fallbacks)) == (0, (TOKENS - 3) * 6)


@pytest.mark.parametrize("replace", ["reset", "grow"])
def test_the_cache_arrays_a_reset_or_growth_replaces_are_freed_at_once(replace, artifacts):
    """The decode step's kernel calls hold the cache's arrays; once the cache replaces them (a reset, a store grown
    by a prefill) the old ones must not outlive the change: held until the next decode step, a new long prompt
    would peak at two caches' worth."""
    import weakref

    model = edge_runtime.load(artifacts["shared-gqa"], kv="fp16")
    cache = model.engine.cache
    cache.growth = 64  # a store grows within the test model's context
    model.reset()
    model.feed(np.arange(4, 40))
    model.feed([7])
    model.feed([8])
    layer = next(layer for layer in cache.stores if model.spec.layer_types[layer] == FULL)  # a ring never grows
    held = [weakref.ref(array) for store in (*cache.stores[layer].keys, *cache.stores[layer].values)
            for array in store.data.values()]
    if replace == "reset":
        model.reset()
    else:
        model.feed(np.arange(4, 4 + 64))
    assert held and not any(ref() is not None for ref in held)
    assert np.isfinite(model.feed([9])).all()


def test_a_prompt_makes_room_for_all_its_tokens_at_once(artifacts, monkeypatch):
    """A long prompt runs in many prefill chunks; grown chunk by chunk, each store would be copied once per chunk
    (quadratic bytes over the prompt) and its freed copies would raise the peak. It is sized once, for the whole
    prompt (and the bench fill for its whole depth); only a later prompt past that grows a store, once."""
    from edge_runtime.kv_cache import CodeStore

    grown = _counted(monkeypatch, CodeStore, "grow")
    model = edge_runtime.load(artifacts["shared-gqa"], kv="tq3.5", kv_recent=4, prefill_chunk=16)
    cache = model.engine.cache
    cache.growth = 32
    model.reset()
    model.feed(np.arange(4, 4 + 150))
    assert (len(grown), cache.length) == (0, 150)
    full_stores = sum(len(store.keys) + len(store.values) for layer, store in cache.stores.items()
                      if model.spec.layer_types[layer] == FULL)
    model.feed(np.arange(4, 4 + 40))
    assert (len(grown), cache.length) == (full_stores, 190)
    grown.clear()
    model.fill_cache(170, np.random.default_rng(0))
    assert (len(grown), cache.length) == (0, 170)

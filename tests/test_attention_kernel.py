"""The compiled attention kernel against the numpy path (the reference) for every KV format, alone and in a model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import edge_runtime
from edge_runtime import attention, attention_kernel
from edge_runtime.attention import Block, attend
from edge_runtime.kv_formats import KV_FORMATS, kv_format
from edge_runtime.quant.code_parts import F32, CodePart, as_bytes, packed_part
from edge_runtime.quant.float_codecs import Float32Codec
from edge_runtime.quant.integer_scores import quantize_rows
from edge_runtime.quant.packing import LookupTable, pack


def _blocks(name: str, dim: int, tokens: int, rng: np.random.Generator, stored: int = 700) -> list[Block]:
    """A coded block (slots in shuffled order, some empty), an exact ring and the step's own tokens, with
    bounds like a sliding layer's: each token sees the last 500 positions up to itself. A width that is no multiple
    of 16, or a last chunk that ends inside a group of 4 keys, takes the kernel's widening path where fp16 is
    otherwise read in place."""
    fmt = kv_format(name)
    keys, values = rng.standard_normal((2, stored, dim)).astype(np.float32)
    key_codec, value_codec = fmt.keys.build(dim, keys), fmt.values.build(dim, values)
    positions = rng.permutation(stored).astype(np.int64)
    positions[rng.choice(stored, 20, replace=False)] = -1
    now = stored + 40 + np.arange(tokens)
    first = now - 500
    exact = Float32Codec(dim)
    ring_keys, ring_values = rng.standard_normal((2, 40, dim)).astype(np.float32)
    new_keys, new_values = rng.standard_normal((2, tokens, dim)).astype(np.float32)
    return [Block(key_codec, key_codec.encode(keys), value_codec, value_codec.encode(values), positions, first,
                  np.full(tokens, stored - 1)),
            Block(exact, exact.encode(ring_keys), exact, exact.encode(ring_values), stored + np.arange(40),
                  np.full(tokens, stored), now),
            Block(exact, exact.encode(new_keys), exact, exact.encode(new_values), now, first, now)]


@pytest.fixture(params=attention_kernel.builds_for_this_machine(attention_kernel.ATTENTION_BUILDS))
def build(request, monkeypatch) -> str:
    """Each build of the kernel this machine can run in turn (x86: baseline, x86-64-v3, x86-64-v4), not only the
    best one `load` picks: their register blockings differ (4, 8 or 16 floats a vector)."""
    kernel = attention_kernel.load_build(request.param)
    assert kernel is not None, f"attention-{request.param}.so is missing or stale: python tools/build_kernels.py"
    monkeypatch.setattr(attention_kernel, "load", lambda: kernel)
    return request.param


@pytest.mark.parametrize("name", list(KV_FORMATS))
@pytest.mark.parametrize("dim,tokens,stored", [(64, 1, 700), (256, 3, 700), (80, 2, 701)])
def test_the_kernel_equals_numpy_for_every_format(name, dim, tokens, stored, build):
    rng = np.random.default_rng(dim + tokens)
    kv_heads, groups = 2, 4
    query = (rng.standard_normal((tokens, kv_heads, groups, dim)) / np.sqrt(dim)).astype(np.float32)
    blocks = [_blocks(name, dim, tokens, rng, stored) for _ in range(kv_heads)]
    expected = attend(query, blocks, kernel=False)
    got = attend(query, blocks, kernel=True)
    assert got.shape == expected.shape == (tokens, kv_heads * groups * dim)
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max(), np.abs(got - expected).max()


@pytest.mark.parametrize("name", ["fp32", "fp16", "tq3.5"])
def test_a_ring_with_chunks_no_token_sees_equals_numpy(name, build):
    """A sliding ring as E2B's (576 slots, window 512): a run of slots already out of the window, some unwritten,
    whole chunks of 32 that no token of the step sees (the kernel skips them) and chunks only the later tokens see."""
    rng = np.random.default_rng(11)
    dim, tokens, slots, window = 64, 3, 576, 512
    now = 2000 + np.arange(tokens)
    positions = np.arange(now[0] - slots, now[0]).astype(np.int64)
    positions = positions[np.argsort(positions % slots)]  # slot p % 576 holds position p
    positions[100:140] = -1
    positions[448:480] = -1
    positions[470] = now[-1] - 1  # written by the step's first tokens: the last one alone sees this chunk
    fmt = kv_format(name)
    keys, values = rng.standard_normal((2, slots, dim)).astype(np.float32)
    key_codec, value_codec = fmt.keys.build(dim, keys), fmt.values.build(dim, values)
    ring = Block(key_codec, key_codec.encode(keys), value_codec, value_codec.encode(values), positions,
                 now - window + 1, now - 1)
    seen_by = [(positions >= low) & (positions <= high) for low, high in zip(now - window + 1, now - 1)]
    chunks = [(np.any([s[c:c + 32].any() for s in seen_by]), seen_by[0][c:c + 32].any()) for c in range(0, slots, 32)]
    assert (False, False) in chunks and (True, False) in chunks  # unseen chunks, and one only later tokens see
    query = (rng.standard_normal((tokens, 1, 4, dim)) / 8).astype(np.float32)
    expected = attend(query, [[ring]], kernel=False)
    got = attend(query, [[ring]], kernel=True)
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max(), np.abs(got - expected).max()


@pytest.mark.parametrize("name", ["fp16", "tq3.5", "qjl"])
def test_a_block_shared_between_threads_gives_the_same_output(name, monkeypatch, build):
    from edge_runtime.worker_threads import Workers

    rng = np.random.default_rng(3)
    query = (rng.standard_normal((1, 1, 4, 64)) / 8).astype(np.float32)
    blocks = [_blocks(name, 64, 1, rng, stored=3000)]
    whole = attend(query, blocks, kernel=True)
    monkeypatch.setattr(attention, "KERNEL_MIN_SHARE_VALUES", 100 * 2 * 64)
    assert len(attention._kernel_calls(0, blocks[0], 3)) == 3  # the coded block in three shares, one per thread
    shared = attend(query, blocks, Workers(3), kernel=True)
    assert np.abs(shared - whole).max() <= 2e-6 * np.abs(whole).max()


def test_decoding_through_the_kernel_gives_numpys_logits(artifacts, monkeypatch):
    """An exact cache decoded token by token past the sliding window (ring wrap, KV sharing): same logits."""
    model = edge_runtime.load(artifacts["shared-mqa-wide"], kv="fp32")
    ids = np.arange(3, 3 + 40)
    got = model.logits(ids, mode="decode")
    monkeypatch.setattr(attention, "KERNEL_TOKENS", 0)
    expected = model.logits(ids, mode="decode")
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["fp16", "int8", "tq3.5", "tq2.5-prod", "qjl"])
def test_every_attention_of_a_decode_agrees_with_numpy(name, artifacts, monkeypatch):
    """Lossy caches, as a model fills them: each step's attention both ways on the same blocks. (Whole logits
    are no test here: a difference in the last float bit can flip a key's rounding to the next fp16 or int8
    step, which later layers carry on.)"""
    from edge_runtime import engine

    checked = []

    def both(query, blocks, pool=None):
        expected = attend(query, blocks, kernel=False)
        got = attend(query, blocks, pool, kernel=True)
        assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max()
        checked.append(sum(b.size for b in blocks[0]))
        return expected

    monkeypatch.setattr(engine, "attend", both)
    model = edge_runtime.load(artifacts["shared-mqa-wide"], kv=name, kv_recent=4, kv_sliding=name)
    model.engine.decode = None  # every step through the loop that calls `attend` (test_decode_step: same calls)
    model.logits(np.arange(3, 3 + 40), mode="decode")
    assert len(checked) == 40 * model.spec.num_hidden_layers and max(checked) > 40


def test_a_block_of_the_tokens_own_rows_takes_one_product_a_token_as_the_masked_square_would(monkeypatch):
    """Each token of a 40-token chunk seeing only its own row of the step's exact block (a lossy format keeping no
    recent tokens exact): numpy scores one dot product per token instead of the masked 40 x 40 square, with the same
    output (the square forced by an invisible extra row, which the shortcut does not take), beside a coded block."""
    rng = np.random.default_rng(3)
    tokens, dim = 40, 64
    positions = np.arange(100, 100 + tokens)
    codec = Float32Codec(dim)
    keys, values = rng.standard_normal((2, tokens, dim)).astype(np.float32)
    own = Block(codec, codec.encode(keys), codec, codec.encode(values), positions, positions, positions)
    padded = own._replace(key_codes=codec.encode(np.vstack([keys, keys[:1]])),
                          value_codes=codec.encode(np.vstack([values, values[:1]])),
                          positions=np.append(positions, -1))
    fp16 = kv_format("fp16")
    stored = rng.standard_normal((2, 100, dim)).astype(np.float32)
    old = Block(fp16.keys.build(dim, stored[0]), fp16.keys.build(dim, stored[0]).encode(stored[0]),
                fp16.values.build(dim, stored[1]), fp16.values.build(dim, stored[1]).encode(stored[1]),
                np.arange(100), np.zeros(tokens, np.int64), positions - 1)
    query = rng.standard_normal((tokens, 1, 4, dim)).astype(np.float32)
    taken = []
    monkeypatch.setattr(attention, "_own_rows", lambda block, real=attention._own_rows: taken.append(real(block))
                        or taken[-1])
    fast = attend(query, [[old, own]], kernel=False)
    assert any(taken)
    taken.clear()
    square = attend(query, [[old, padded]], kernel=False)
    assert not any(taken)
    np.testing.assert_allclose(fast, square, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["int8", "tq3.5", "fp16"])
def test_weights_below_float32s_normal_range_leave_the_output_and_the_callers_float_mode_alone(name, build):
    """Scores spread over hundreds give weights near exp(-87), and times a row's scale they fall below 2**-126: the
    kernel flushes those to zero for its call (an Intel core takes a microcode assist for each multiply-add that meets
    one), which changes nothing at float32 precision, and the caller's arithmetic keeps its subnormals after."""
    rng = np.random.default_rng(5)
    dim, tokens = 256, 1
    query = (rng.standard_normal((tokens, 1, 8, dim)) * 4).astype(np.float32)  # scores with a std of ~64
    blocks = [_blocks(name, dim, tokens, rng)]
    expected = attend(query, blocks, kernel=False)
    got = attend(query, blocks, kernel=True)
    # scores of ~200 carry float32 rounding of ~1e-5, which exp passes on to the weights whatever the flushing
    assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max(), np.abs(got - expected).max()
    tiny = np.array([2.0 ** -126], np.float32)
    assert (tiny / np.float32(4))[0] == np.float32(2.0 ** -128)


@pytest.mark.parametrize("dim", [64, 80])
def test_half_precision_values_below_its_normal_range_are_read_as_stored(dim, build):
    """An fp16 cache whose values are all below 2**-14 (half precision's subnormals): the kernel runs with float
    subnormals treated as zero, and each build's widening of halves must still give them their value, not 0 (the
    baseline build's did, before it rebiased exponents as integers). dim 80 takes the widening path on every build."""
    rng = np.random.default_rng(dim)
    fp16 = kv_format("fp16")
    keys = rng.standard_normal((300, dim)).astype(np.float32)
    values = rng.uniform(-6e-5, 6e-5, (300, dim)).astype(np.float32)
    key_codec, value_codec = fp16.keys.build(dim, keys), fp16.values.build(dim, values)
    codes = value_codec.encode(values)
    assert (np.abs(values.astype(np.float16)) < np.float16(2.0 ** -14)).all()
    block = Block(key_codec, key_codec.encode(keys), value_codec, codes, np.arange(300), np.zeros(1, np.int64),
                  np.full(1, 299))
    query = (rng.standard_normal((1, 1, 8, dim)) / np.sqrt(dim)).astype(np.float32)
    expected = attend(query, [[block]], kernel=False)
    got = attend(query, [[block]], kernel=True)
    assert np.abs(expected).max() > 1e-6
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max(), np.abs(got - expected).max()


def test_a_hadamard_part_the_kernels_butterflies_do_not_fit_is_refused_before_the_call():
    _part = attention_kernel._part
    codec = kv_format("tq4").keys.build(256, np.ones((4, 256), np.float32))
    part = codec.parts(codec.encode(np.ones((3, 256), np.float32)))[0]
    assert _part(part, 256).rounds == 3 and part.hadamard.shape == (3, 256)
    with pytest.raises(ValueError, match=r"width 200, 256 channels, signs \(3, 256\)"):
        _part(replace(part, width=200), 256)
    with pytest.raises(ValueError, match=r"width 256, 128 channels"):
        _part(replace(part, channels=np.arange(128)), 256)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [80, 200, 256])
def test_keys_with_integer_levels_score_as_exact_integer_sums_on_every_build(bits, width, build):
    """A packed key part with int8 levels, no transform: each build decodes the codes to bytes in its own steps (64,
    32 or 16 codes, a code at a time past the last whole step: widths 80 and 200) and sums the products with its own
    integer instructions; the scores must be numpy's float32 product of the same integers (exact), so the attention
    output equals the reference to float32 precision."""
    rng = np.random.default_rng(bits * 1000 + width)
    n, rows = 300, 8
    levels = np.sort(rng.choice(np.arange(-127, 128), 2**bits, replace=False)).astype(np.int8)
    step = np.float32(0.3 / 127 / np.sqrt(width))
    table = LookupTable(levels.astype(np.float32) * step, bits, width)
    codes = pack(rng.integers(0, 2**bits, (n, width)), bits)
    norm = rng.uniform(0.5, 2.0, n).astype(np.float32)
    key = packed_part(codes, table, width, norm, levels=levels, step=step)
    values = rng.standard_normal((n, width)).astype(np.float32)
    value = CodePart(F32, width, as_bytes(values))
    query = (rng.standard_normal((rows, width)) * 3).astype(np.float32)  # scores of a few units
    coded = (np.arange(n, dtype=np.int64), np.zeros(1, np.int64), np.full(1, n - 1, np.int64))
    got = attention_kernel.attend_head_parts(attention_kernel.load(), query, [key], [value], coded, [], rows, True)
    integers, scale = quantize_rows(query)
    scores = integers @ LookupTable(levels.astype(np.float32), bits, width)(codes).T * (scale * step)[:, None] * norm
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected = (weights @ values) / weights.sum(axis=1, keepdims=True)
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max(), np.abs(got - expected).max()


def test_integer_levels_on_a_part_they_cannot_describe_are_refused_before_the_call():
    codec = kv_format("tq4").keys.build(256, np.ones((4, 256), np.float32))
    part = codec.parts(codec.encode(np.ones((3, 256), np.float32)))[0]
    assert attention_kernel._part(part, 256).levels is not None
    with pytest.raises(ValueError, match=r"levels int16 \(16,\)"):
        attention_kernel._part(replace(part, levels=part.levels.astype(np.int16)), 256)
    with pytest.raises(ValueError, match=r"bits 4, levels int8 \(8,\)"):
        attention_kernel._part(replace(part, levels=part.levels[:8]), 256)

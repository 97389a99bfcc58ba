"""QLoRA: NF4 quantisation against a numpy re-derivation (loops over blocks) and bytes made by bitsandbytes, the
round-trip error bound, and LoRA over a 4-bit base (logits, training, peft on the full-precision base)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.lora import (NF4_CODE, LoraConfig, NF4Tensor, dequantize_nf4, dequantize_params, init_lora,
                           merge_lora, quantize_base, quantize_nf4)
from rlhf_jax.quant import DYNAMIC_CODE, nf4_absmax

NF4_VALUES = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]
"""bitsandbytes' functional.get_4bit_type("nf4"), copied from its source."""


# ----------------------------------------------------------------------------------------------- references
def _normal_map(offset=0.9677083):
    """QLoRA's NF4 construction (bitsandbytes' create_normal_map(offset, use_extra_value=True)): 8 positive
    quantiles of N(0, 1) on [offset, 0.5), 7 negative ones, and 0; sorted and divided by the largest."""
    from scipy.stats import norm
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1]).tolist()
    neg = (-norm.ppf(np.linspace(offset, 0.5, 8)[:-1])).tolist()
    v = np.sort(np.asarray(pos + [0.0] + neg))
    return v / v.max()


def _nearest(x, code):
    """Index of the code value nearest to each x: the number of float32 midpoints of adjacent code values that x
    exceeds (a value on a midpoint takes the lower index)."""
    code = np.asarray(code, np.float32)
    mids = (code[:-1] + code[1:]) / np.float32(2)
    return np.sum(np.asarray(x, np.float32)[:, None] > mids[None, :], axis=1)


def _blocks_ref(flat, bs, code):
    """Loop over blocks of bs: (indices, absmax) with scaled = x * (1 / absmax) in float32, clipped to [-1, 1]."""
    idx, amax = [], []
    for start in range(0, len(flat), bs):
        block = np.zeros(bs, np.float32)
        block[:len(flat[start:start + bs])] = flat[start:start + bs]
        a = np.float32(np.max(np.abs(block)))
        inv = np.float32(1) / np.float32(max(a, np.float32(1e-38)))
        amax.append(a)
        idx += _nearest(np.clip(block * inv, -1, 1), code).tolist()
    return np.asarray(idx), np.asarray(amax, np.float32)


def _quantize_ref(w, bs=64, double_quant=True):
    """(4-bit indices, packed bytes, absmax as dequantised) by loops over blocks."""
    flat = np.asarray(w, np.float32).reshape(-1)
    idx, amax = _blocks_ref(flat, bs, NF4_VALUES)
    packed = np.asarray([(idx[i] << 4) | idx[i + 1] for i in range(0, len(idx), 2)], np.uint8)
    if not double_quant:
        return idx, packed, amax, None
    offset = np.float32(np.mean(amax, dtype=np.float64))
    q2, s2 = _blocks_ref(amax - offset, 256, DYNAMIC_CODE)
    q2 = q2[:len(amax)]
    deq = np.asarray(DYNAMIC_CODE, np.float32)[q2] * np.repeat(s2, 256)[:len(amax)] + offset
    return idx, packed, deq, q2


# ----------------------------------------------------------------------------------------------- NF4 itself
def test_the_code_is_bitsandbytes_and_the_normal_quantiles():
    assert NF4_CODE == tuple(NF4_VALUES)
    np.testing.assert_allclose(NF4_CODE, _normal_map(), atol=2e-7)
    code = np.asarray(DYNAMIC_CODE)
    assert len(code) == 256 and np.all(np.diff(code) > 0) and code[-1] == 1.0 and 0.0 in code
    assert code[0] == pytest.approx(-0.99296875, abs=1e-7)               # -(mean of 1 - 0.9/64 and 1)
    assert np.max(np.diff(code[code > 0.1])) == pytest.approx(0.9 / 64, abs=1e-6)


SHAPES = [((3, 100), False), ((641, 50), True)]     # sizes not multiples of 64; 501 blocks: two 8-bit blocks


def _weights(shape, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    w.reshape(-1)[64:128] *= 20.0                                        # one block far larger than the rest
    w.reshape(-1)[:7] = 0.0
    return w


@pytest.mark.parametrize("shape, double_quant", SHAPES)
def test_quantize_matches_a_loop_over_blocks(shape, double_quant):
    w = _weights(shape)
    q = quantize_nf4(jnp.asarray(w), double_quant=double_quant)
    idx, packed, amax, q2 = _quantize_ref(w, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed)
    hi, lo = np.asarray(q.codes).reshape(-1) >> 4, np.asarray(q.codes).reshape(-1) & 0xF
    np.testing.assert_array_equal(np.stack([hi, lo], -1).reshape(-1), idx)        # first value: high nibble
    if double_quant:
        assert q.absmax.dtype == jnp.uint8 and q.absmax_scale.shape == (math.ceil(len(amax) / 256),)
        np.testing.assert_array_equal(np.asarray(q.absmax), q2)
        np.testing.assert_allclose(nf4_absmax(q), amax, rtol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(q.absmax), amax)
    got = np.asarray(dequantize_nf4(q))
    assert got.shape == shape and got.dtype == np.float32
    want = (np.asarray(NF4_VALUES, np.float32)[idx] * np.repeat(amax, 64))[:w.size].reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_bytes_made_by_bitsandbytes():
    """bitsandbytes 0.50.2 `quantize_4bit(w, blocksize=64, quant_type="nf4")` on CPU, for w below: its packed
    bytes and absmax; with double quantisation its 8-bit codes, and its constants to float32 rounding."""
    w = ((np.arange(128) * 37 % 101) - 50).astype(np.float32) / np.float32(1000)
    w[64:] *= np.float32(3)
    bnb_hex = ("04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d1"
               "8e2a04c16e29f3b05d17e29f3c05d18")
    q = quantize_nf4(jnp.asarray(w), double_quant=False)
    assert np.asarray(q.codes).reshape(-1).tobytes().hex() == bnb_hex
    np.testing.assert_array_equal(np.asarray(q.absmax), np.float32([0.05, 0.15]))
    # double quantisation (compress_statistics=True) of six blocks of other scales: bitsandbytes' 8-bit codes,
    # and its constants (dequantize_blockwise(absmax, state2) + offset)
    w6 = ((np.arange(384) * 37 % 101) - 50).astype(np.float32) / np.float32(1000)
    w6 *= np.repeat(np.float32([1, 3, 0.5, 7, 2, 0.25]), 64)
    q = quantize_nf4(jnp.asarray(w6), double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.absmax), [51, 194, 44, 255, 77, 40])
    bnb_centred = [-0.06492350250482559, 0.035128578543663025, -0.08809732645750046, 0.23541665077209473,
                   -0.014603189192712307, -0.10133951157331467]
    np.testing.assert_allclose(nf4_absmax(q), np.float32(bnb_centred) + np.float32(0.1145833358168602), rtol=1e-6)


@pytest.mark.parametrize("shape, double_quant", SHAPES)
def test_round_trip_error_is_within_the_bound_of_each_block(shape, double_quant):
    """|w - w~| <= absmax * (largest NF4 gap) / 2 per block, plus |absmax - absmax~| from double quantisation
    (at most s * (largest DYNAMIC_CODE gap) / 2 per block of 256 constants); the largest error is over half the
    bound."""
    w = _weights(shape, seed=1)
    q = quantize_nf4(jnp.asarray(w), double_quant=double_quant)
    flat = np.pad(w.reshape(-1), (0, q.codes.shape[0] * 64 - w.size)).reshape(-1, 64)
    err = np.abs(flat - np.pad(np.asarray(dequantize_nf4(q)).reshape(-1), (0, flat.size - w.size)).reshape(-1, 64))
    absmax = np.abs(flat).max(1)
    half_gap = np.max(np.diff(NF4_CODE)) / 2                                    # (1 - 0.696) / 2 = 0.152
    bound = absmax * half_gap * (1 + 1e-6)
    if double_quant:
        centred = np.pad(absmax - absmax.mean(), (0, 512 - len(absmax))).reshape(-1, 256)
        dq_bound = np.repeat(np.abs(centred).max(1), 256)[:len(absmax)] * np.max(np.diff(DYNAMIC_CODE)) / 2
        np.testing.assert_array_less(np.abs(np.asarray(nf4_absmax(q)) - absmax), dq_bound * 1.001 + 1e-9)
        bound = bound + dq_bound * 1.001 + 1e-9
    assert np.all(err.max(1) <= bound)
    assert np.max(err.max(1) / bound) > 0.5                                     # and the bound is not loose


@pytest.mark.parametrize("shape, double_quant", SHAPES)
def test_quantizing_the_dequantized_tensor_gives_the_same_codes(shape, double_quant):
    q = quantize_nf4(jnp.asarray(_weights(shape)), double_quant=double_quant)
    again = quantize_nf4(dequantize_nf4(q), double_quant=double_quant)
    np.testing.assert_array_equal(again.codes, q.codes)
    if double_quant:       # the constants' mean moves, so their 8-bit codes may too; their values stay put
        np.testing.assert_allclose(nf4_absmax(again), nf4_absmax(q), rtol=0.02, atol=1e-6)
    else:
        np.testing.assert_array_equal(again.absmax, q.absmax)


def test_zeros_constant_blocks_and_ties():
    w = np.zeros((3, 64), np.float32)
    w[1] = 0.25                                                                 # constant block: all +1.0
    w[2, :4] = [1.0, -1.0, 0.5 * (NF4_CODE[8] + NF4_CODE[9]), 0.5 * (NF4_CODE[6] + NF4_CODE[7])]
    mids = [np.float32((np.float32(NF4_CODE[j]) + np.float32(NF4_CODE[j + 1])) / 2) for j in (8, 6)]
    w[2, 2:4] = mids                                                            # exactly on midpoints
    for double_quant in (False, True):
        q = quantize_nf4(jnp.asarray(w), double_quant=double_quant)
        idx = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 0xF], -1).reshape(3, 64)
        assert np.all(idx[0] == 7) and np.all(idx[1] == 15)                    # zeros -> the 0.0 code
        assert list(idx[2, :4]) == [15, 0, 8, 6]                               # a tie takes the lower code
        back = np.asarray(dequantize_nf4(q))
        np.testing.assert_array_equal(back[0], 0.0)
        np.testing.assert_allclose(back[1], 0.25, rtol=1e-2 if double_quant else 0)
        assert np.all(np.isfinite(back))


def test_nf4_tensor_is_a_pytree_that_jits_and_saves(tmp_path):
    import orbax.checkpoint as ocp
    w = jnp.asarray(_weights((3, 100)))
    q = quantize_nf4(w)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 4 and jax.tree.unflatten(treedef, leaves) == q
    assert (q.shape, q.dtype, q.block_size) == ((3, 100), "float32", 64)
    assert q.nbytes == 5 * 32 + 5 + 4 + 4                                    # 4 bits a weight + constants
    tree = {"kernel": q, "bias": jnp.ones(3)}
    out = jax.jit(lambda t: dequantize_params(t)["kernel"] * 2)(tree)
    np.testing.assert_array_equal(out, 2 * dequantize_nf4(q))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "p", tree)
    checkpointer.wait_until_finished()
    back = checkpointer.restore(tmp_path / "p", jax.eval_shape(lambda: tree))
    assert isinstance(back["kernel"], NF4Tensor)
    np.testing.assert_array_equal(dequantize_nf4(back["kernel"]), dequantize_nf4(q))
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(w, block_size=63)


# ----------------------------------------------------------------------------------------------- QLoRA
@pytest.fixture(scope="module")
def qlora_sft():
    """A tiny Llama, its NF4 base, and rank-4 adapters trained on that base by run_sft (16 steps)."""
    from _multihost_worker import make_sft_batches
    from _tiny_models import LLAMA
    from rlhf_jax.models import init_params
    from rlhf_jax.train import stages
    from rlhf_jax.train.optim import OptimConfig
    from rlhf_jax.train.state import create_train_state
    cfg = LLAMA.replace(qkv_bias=False)
    params = init_params(cfg, jax.random.key(0))
    base = quantize_base(params)
    lora = LoraConfig(rank=4, alpha=8.0)
    optim = OptimConfig(learning_rate=2e-2)
    state = create_train_state(init_lora(base, cfg, lora, jax.random.key(1)), optim, 0)
    batch = make_sft_batches(cfg.vocab_size, num_steps=1)[0]
    state, hist = stages.run_sft(state, [batch] * 16, stages.SFTConfig(num_steps=16, log_every=1, optim=optim),
                                 model_config=cfg, lora=lora, base_params=base)
    return {"cfg": cfg, "params": params, "base": base, "lora": lora, "adapters": state.params, "hist": hist}


def test_the_base_keeps_linear_kernels_in_nf4_and_the_rest_as_it_was(qlora_sft):
    params, base = qlora_sft["params"], qlora_sft["base"]
    nf4 = {name for group in ("attn", "mlp") for name, m in base["layers"][group].items()
           if isinstance(m["kernel"], NF4Tensor)}
    assert nf4 == {"q", "k", "v", "o", "gate", "up", "down"}
    assert base["embed"] is params["embed"] and base["lm_head"] is params["lm_head"]
    assert base["layers"]["attn_norm"] is params["layers"]["attn_norm"]
    kernels = [m["kernel"] for g in ("attn", "mlp") for m in base["layers"][g].values()]
    weights = sum(math.prod(k.shape) for k in kernels)
    assert sum(k.nbytes for k in kernels) * 8 / weights < 4.2                 # 4 bits + 8-bit constants per 64
    assert all(k.codes.dtype == jnp.uint8 for k in kernels)


def test_quantized_model_logits_are_close_to_full_precision(qlora_sft):
    """The tiny random-init Llama: max |logit difference| < 0.05 and mean KL(full || NF4) < 1e-4 per token
    (measured 0.016 and 4.7e-6; the GPT-2 preset gives 0.017 and 1.0e-5)."""
    from _tiny_models import _tokens
    from rlhf_jax.models import forward
    cfg, params, base = qlora_sft["cfg"], qlora_sft["params"], qlora_sft["base"]
    tokens = _tokens(2, 9)
    full = forward(params, tokens, config=cfg)
    quant = forward(dequantize_params(base), tokens, config=cfg)
    assert 1e-4 < float(jnp.max(jnp.abs(full - quant))) < 0.05                # quantised, and close
    lp, lq = jax.nn.log_softmax(full), jax.nn.log_softmax(quant)
    assert float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))) < 1e-4


def test_merge_over_the_nf4_base_is_the_merge_over_its_dequantized_kernels(qlora_sft):
    base, lora, adapters = qlora_sft["base"], qlora_sft["lora"], qlora_sft["adapters"]
    merged = jax.jit(lambda b, a: merge_lora(b, a, lora))(base, adapters)
    want = merge_lora(dequantize_params(base), adapters, lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not any(isinstance(x, NF4Tensor) for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(
        x, NF4Tensor)))
    nothing = merge_lora(base, {}, lora)                                        # no adapters: the dequantised base
    np.testing.assert_array_equal(nothing["layers"]["attn"]["q"]["kernel"],
                                  dequantize_nf4(base["layers"]["attn"]["q"]["kernel"]))


def test_qlora_sft_learns(qlora_sft):
    hist = qlora_sft["hist"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3, [h["loss"] for h in hist]
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert set(qlora_sft["adapters"]) == {"attn", "mlp"}                       # the state: adapters only


def test_adapters_trained_on_the_nf4_base_load_in_peft_on_the_full_precision_base(qlora_sft, tmp_path):
    """QLoRA's deployment: the adapter is saved as plain LoRA; peft over the full-precision Hugging Face base
    gives our merge over the full-precision params."""
    from test_lora import _hf_logits
    from _tiny_models import _tokens
    from rlhf_jax.lora import save_peft
    from rlhf_jax.models import forward
    from rlhf_jax.models.hf import save_pretrained
    cfg, params, lora, adapters = (qlora_sft[k] for k in ("cfg", "params", "lora", "adapters"))
    save_pretrained(cfg, jax.device_get(params), tmp_path / "base")
    save_peft(adapters, lora, cfg, tmp_path / "adapter")
    tokens = _tokens(2, 9)
    ours = np.asarray(forward(merge_lora(params, adapters, lora), tokens, config=cfg))
    theirs = _hf_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    assert np.max(np.abs(ours - np.asarray(forward(params, tokens, config=cfg)))) > 1e-2   # trained adapters
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_lora_quantize_needs_a_rank_and_a_4bit_base(capsys, qlora_sft):
    from rlhf_jax.cli import sft
    from rlhf_jax.runner import LoraSpec, trainable_state
    from rlhf_jax.train.optim import OptimConfig
    with pytest.raises(SystemExit) as e:
        sft.main(["--lora.quantize", "nf4", "--out", "unused"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--lora.quantize nf4" in err and "--lora.rank" in err
    cfg, params = qlora_sft["cfg"], qlora_sft["params"]
    run = sft.SFTExperiment(lora=LoraSpec(rank=2, quantize="nf4"))
    base = run.lora.base(params)
    assert LoraSpec().base(params) is params and base["embed"] is params["embed"]
    state, kwargs = trainable_state(run, base, cfg, OptimConfig(schedule="constant"), 4)
    assert kwargs["lora"].rank == 2 and state.params["mlp"]["down"]["b"].shape == (cfg.num_layers, 2, cfg.d_model)
    with pytest.raises(ValueError, match="does not train over a 4-bit base"):   # a command that did not quantise
        trainable_state(run, params, cfg, OptimConfig(schedule="constant"), 4)
    with pytest.raises(ValueError, match="--mesh"):
        trainable_state(sft.SFTExperiment(lora=run.lora, mesh=(1, 1, 1)), base, cfg, OptimConfig(), 4)


def test_dpo_command_trains_adapters_over_the_nf4_base_with_it_as_the_reference(tmp_path):
    """`rlhf-jax dpo --lora.rank R --lora.quantize nf4`: the policy is the NF4 base plus adapters (b = 0 at the
    start) and the reference is the same NF4 base without them, so the first step's implicit rewards are exactly
    zero (a full-precision reference would differ from the 4-bit policy); the final params load."""
    from rlhf_jax.cli import dpo
    out = tmp_path / "run"
    assert dpo.main(["--out", str(out), "--model.num-layers", "1", "--data.num-demo", "8", "--data.batch-size", "4",
                     "--data.seq-len", "32", "--model.max-seq-len", "32", "--dpo.num-steps", "1", "--dpo.log-every",
                     "1", "--dpo.optim.warmup-steps", "0", "--lora.rank", "2", "--lora.quantize", "nf4",
                     "--checkpoint.no-tensorboard"]) == 0
    (line,) = [json.loads(x) for x in open(out / "dpo" / "metrics.jsonl")]
    assert line["rewards/chosen"] == 0.0 and line["rewards/rejected"] == 0.0, line
    assert (out / "dpo" / "final" / "model_config.json").exists()


# ------------------------------------------------------------------------------------ one layer at a time
def _step_memory_and_result(cfg, base, adapters, lora, batch, *, lazy: bool, monkeypatch):
    """(temporary bytes of the compiled QLoRA SFT step, its loss and adapter gradients) with the adapters merged
    lazily (one layer at a time in the scan) or eagerly (the whole stack dequantised first)."""
    from rlhf_jax.train import steps
    real = steps.lora_params
    monkeypatch.setattr(steps, "lora_params", lambda b, t, cfg_, lazy_=False, **k: real(b, t, cfg_, lazy=lazy))

    def loss(trainable):
        return steps.on_adapters(steps.sft_nll, base, lora)(trainable, batch, model_config=cfg)[0]

    fn = jax.jit(jax.value_and_grad(loss))
    temp = fn.lower(adapters).compile().memory_analysis().temp_size_in_bytes
    value, grads = fn(adapters)
    monkeypatch.setattr(steps, "lora_params", real)
    return temp, value, grads


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_layer_scan_dequantizes_one_layer_at_a_time(remat, monkeypatch):
    """The loss and the adapters' gradients are the eager merge's; the compiled step's temporary memory is below
    the eager step's by about the dequantised stack (8 layers), and with remat (QLoRA's gradient checkpointing)
    below the size of the dequantised stack itself."""
    from rlhf_jax.models import ModelConfig, init_params
    cfg = ModelConfig(vocab_size=64, d_model=128, num_layers=8, num_heads=4, mlp_dim=512, max_seq_len=32,
                      norm="rms", mlp="swiglu", positional="rope", remat=remat)
    params = init_params(cfg, jax.random.key(0))
    base = quantize_base(params)
    lora = LoraConfig(rank=4, alpha=8.0)
    adapters = init_lora(base, cfg, lora, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)                     # b != 0: the merge matters
    tokens = np.random.default_rng(0).integers(0, 64, (2, 17))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((2, 16), jnp.float32)}
    eager = _step_memory_and_result(cfg, base, adapters, lora, batch, lazy=False, monkeypatch=monkeypatch)
    lazy = _step_memory_and_result(cfg, base, adapters, lora, batch, lazy=True, monkeypatch=monkeypatch)
    np.testing.assert_allclose(lazy[1], eager[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(lazy[2]), jax.tree.leaves(eager[2])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    stack = sum(math.prod(m["kernel"].shape) * 4 for g in ("attn", "mlp") for m in params["layers"][g].values()
                if "kernel" in m)                                               # the dequantised kernels, f32
    assert eager[0] - lazy[0] > 0.7 * stack, (eager[0], lazy[0], stack)
    if remat == "full":
        assert lazy[0] < 0.5 * stack, (lazy[0], stack)

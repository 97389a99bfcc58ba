"""LoRA adapters: merge against numpy, gradients pulled back through a and b, and the peft format both ways
against `peft` over `transformers` (GPT-2 with its fused c_attn, and a Llama with grouped-query attention)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.lora import LoraConfig, init_lora, load_peft, merge_lora, save_peft
from rlhf_jax.models import forward, init_params
from rlhf_jax.models.hf import save_pretrained

from _tiny_models import GPT, LLAMA, _tokens

CFGS = {"gpt2": GPT.replace(max_seq_len=16), "llama": LLAMA.replace(qkv_bias=False)}


def _random_adapters(params, cfg, lora, seed=0):
    """Adapters with b != 0 too (a trained adapter), so that every merged kernel moves."""
    adapters = init_lora(params, cfg, lora, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_init_is_the_base_and_merge_is_w_plus_scaled_ab(name):
    cfg = CFGS[name]
    params = init_params(cfg, jax.random.key(0))
    lora = LoraConfig(rank=3, alpha=5.0)
    adapters = init_lora(params, cfg, lora, jax.random.key(1))
    assert set(adapters["attn"]) == {"q", "k", "v", "o"}
    assert set(adapters["mlp"]) == ({"gate", "up", "down"} if name == "llama" else {"up", "down"})
    merged = merge_lora(params, adapters, lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)                                      # b = 0: the base exactly
    q = adapters["attn"]["q"]["a"]
    assert q.shape == (cfg.num_layers, cfg.d_model, 3) and float(jnp.max(jnp.abs(q))) <= 1 / math.sqrt(cfg.d_model)
    assert float(jnp.std(q)) > 0.5 / math.sqrt(3 * cfg.d_model)                 # uniform on +-1/sqrt(in): std 0.577/..

    adapters = _random_adapters(params, cfg, lora)
    merged = merge_lora(params, adapters, lora)
    for group, modules in adapters.items():
        for mod, ad in modules.items():
            w = np.asarray(params["layers"][group][mod]["kernel"])
            got = np.asarray(merged["layers"][group][mod]["kernel"])
            a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
            for layer in range(cfg.num_layers):                                  # a loop over layers and entries
                delta = np.zeros((a.shape[1], b.shape[2]))
                for i in range(a.shape[1]):
                    for o in range(b.shape[2]):
                        delta[i, o] = sum(a[layer, i, r] * b[layer, r, o] for r in range(a.shape[2]))
                want = w[layer] + lora.scale * delta.reshape(w.shape[1:])
                np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6, err_msg=f"{group}.{mod}")
    assert merged["embed"] is params["embed"]                                    # untargeted leaves: the same arrays


def test_adapter_gradients_are_the_merged_gradient_pulled_back():
    """d loss / d a = s G b^T and d loss / d b = s a^T G, with G = d loss / d W of the merged kernel (numpy)."""
    cfg = CFGS["llama"]
    params = init_params(cfg, jax.random.key(0))
    lora = LoraConfig(rank=2, alpha=3.0, targets=("q", "down"))
    adapters = _random_adapters(params, cfg, lora)
    tokens = _tokens(2, 7)

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(forward(p, tokens, config=cfg))[..., 3])

    g_ad = jax.grad(lambda ad: loss(merge_lora(params, ad, lora)))(adapters)
    g_w = jax.grad(loss)(merge_lora(params, adapters, lora))
    for group, mod in (("attn", "q"), ("mlp", "down")):
        a, b = np.asarray(adapters[group][mod]["a"]), np.asarray(adapters[group][mod]["b"])
        G = np.asarray(g_w["layers"][group][mod]["kernel"]).reshape(a.shape[0], a.shape[1], b.shape[2])
        want_a = lora.scale * np.einsum("lio,lro->lir", G, b)
        want_b = lora.scale * np.einsum("lir,lio->lro", a, G)
        np.testing.assert_allclose(g_ad[group][mod]["a"], want_a, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g_ad[group][mod]["b"], want_b, rtol=1e-4, atol=1e-7)
    assert set(g_ad) == {"attn", "mlp"} and set(g_ad["attn"]) == {"q"}        # only the adapters have gradients


def test_bad_configs():
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="no \\['gate'\\]|gate"):
        init_lora(init_params(CFGS["gpt2"], jax.random.key(0)), CFGS["gpt2"], LoraConfig(targets=("gate",)),
                  jax.random.key(0))


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _hf_logits(base_dir, adapter_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name, targets", [("gpt2", ("q", "v", "o", "up", "down")),
                                           ("llama", ("q", "k", "v", "o", "gate", "up", "down"))])
def test_save_peft_loads_in_peft_with_our_merged_logits(tmp_path, name, targets):
    cfg = CFGS[name]
    params = init_params(cfg, jax.random.key(0))
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = _random_adapters(params, cfg, lora)
    save_pretrained(cfg, jax.device_get(params), tmp_path / "base")
    save_peft(adapters, lora, cfg, tmp_path / "adapter")
    tokens = _tokens(2, 9)
    ours = np.asarray(forward(merge_lora(params, adapters, lora), tokens, config=cfg))
    theirs = _hf_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    base = np.asarray(forward(params, tokens, config=cfg))
    assert np.max(np.abs(ours - base)) > 1e-2                                  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    back, lora_back = load_peft(tmp_path / "adapter", cfg)                     # and our own reader agrees
    np.testing.assert_allclose(forward(merge_lora(params, back, lora_back), tokens, config=cfg), ours, atol=1e-5)


@pytest.mark.parametrize("name, modules", [("gpt2", ["c_attn", "c_proj", "c_fc"]),
                                           ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])])
def test_load_peft_reads_an_adapter_made_by_peft(tmp_path, name, modules):
    cfg = CFGS[name]
    params = init_params(cfg, jax.random.key(0))
    save_pretrained(cfg, jax.device_get(params), tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=modules, init_lora_weights=False,
                             fan_in_fan_out=name == "gpt2", rank_pattern={modules[-1]: 5},
                             alpha_pattern={modules[-1]: 2})
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    tokens = _tokens(2, 9)
    theirs = _hf_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    adapters, lora = load_peft(tmp_path / "adapter", cfg)
    assert (lora.rank, lora.alpha) == (3, 7.0)
    ours = np.asarray(forward(merge_lora(params, adapters, lora), tokens, config=cfg))
    assert np.max(np.abs(theirs - np.asarray(forward(params, tokens, config=cfg)))) > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_lora_sft_and_dpo_train_only_the_adapters():
    """run_sft / run_dpo with lora: the state (and so the optimizer and the checkpoint) holds the adapters only,
    the loss falls, the base is left as it was (not donated); DPO's reference is the base itself, so its first
    loss is log 2 (b = 0: policy == reference)."""
    from _multihost_worker import make_sft_batches
    from rlhf_jax.train import stages
    from rlhf_jax.train.optim import OptimConfig
    from rlhf_jax.train.state import create_train_state
    cfg = CFGS["llama"]
    base = init_params(cfg, jax.random.key(0))
    before = jax.tree.map(np.asarray, base)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))
    optim = OptimConfig(learning_rate=2e-2)
    state = create_train_state(init_lora(base, cfg, lora, jax.random.key(1)), optim, 0)
    assert {leaf.shape for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 3} <= {
        leaf.shape for leaf in jax.tree.leaves(state.params)}                       # Adam moments of adapters only
    batch = make_sft_batches(cfg.vocab_size, num_steps=1)[0]
    state, hist = stages.run_sft(state, [batch] * 8, stages.SFTConfig(num_steps=8, log_every=1, optim=optim),
                                 model_config=cfg, lora=lora, base_params=base)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)                                         # the base: unchanged, alive
    with pytest.raises(ValueError, match="lora and base_params go together"):
        stages.run_sft(state, [batch], stages.SFTConfig(num_steps=1), model_config=cfg, lora=lora)

    chosen = make_sft_batches(cfg.vocab_size, num_steps=1, seed=1)[0]
    rejected = make_sft_batches(cfg.vocab_size, num_steps=1, seq_len=6, seed=2)[0]
    state = create_train_state(init_lora(base, cfg, lora, jax.random.key(2)), optim, 0)
    _, hist = stages.run_dpo(state, [{"chosen": chosen, "rejected": rejected}] * 6,
                             stages.DPOConfig(num_steps=6, log_every=1, optim=optim), model_config=cfg,
                             ref_params=base, lora=lora)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_lora_reward_model_trains_adapters_and_its_head():
    from _multihost_worker import make_sft_batches
    from rlhf_jax.train import stages
    from rlhf_jax.train.optim import OptimConfig
    from rlhf_jax.train.state import create_train_state, with_score_head
    cfg = CFGS["gpt2"]
    base = init_params(cfg, jax.random.key(0))
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "o"))
    head = with_score_head(base, cfg, 7)["score_head"]
    optim = OptimConfig(learning_rate=1e-2)
    state = create_train_state({**init_lora(base, cfg, lora, jax.random.key(1)), "score_head": head}, optim, 0)
    chosen = make_sft_batches(cfg.vocab_size, num_steps=1, seq_len=10, seed=1)[0]
    rejected = make_sft_batches(cfg.vocab_size, num_steps=1, seq_len=6, seed=2)[0]
    state, hist = stages.run_reward(state, [{"chosen": chosen, "rejected": rejected}] * 6,
                                    stages.RewardConfig(num_steps=6, log_every=1, optim=optim), model_config=cfg,
                                    lora=lora, base_params=base)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert set(state.params) == {"attn", "score_head"}
    assert float(jnp.abs(state.params["score_head"]["kernel"] - head["kernel"]).max()) > 0
    assert float(jnp.abs(state.params["attn"]["o"]["b"]).max()) > 0

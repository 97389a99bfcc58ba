"""Multi-turn rollouts (rlhf_jax.train.multiturn) and `rlhf-jax grpo --env`: the built sequence and its policy mask
against the chat template's own rendering of the whole conversation (`encode_chat`), episodes of different turn
counts from one compiled sampler whose log-probs the trainer's forward over the built sequence reproduces, and the
command."""
import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.envs import CalculatorEnv, EpisodeBudget
from rlhf_jax.generation import SamplingConfig, Samples
from rlhf_jax.tokenizer import ByteTokenizer, ChatFormat, encode_chat, encode_prompt
from rlhf_jax.train.multiturn import (conversation_slots, make_turn_sampler, rollout_episodes, rollout_metrics,
                                     sample_turn)
from rlhf_jax.train.rl import episode_logprobs

TOK = ByteTokenizer()
CALL = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
BAD_CALL = '<tool_call>\n{"name": "calculate", "arguments": \n</tool_call>'


def _scripted(replies, K, seen, tok=TOK):
    """A sampler that writes `replies[turn]` (then EOS, cut at K tokens) in every row, recording its prompts."""
    def sample_fn(prompts, prompt_mask, rng):
        R, C = prompts.shape
        seen.append((np.asarray(prompts), np.asarray(prompt_mask)))
        ids = (tok.encode(replies[len(seen) - 1]) + [tok.eos_id])[:K]
        tokens = np.full((R, C + K), tok.pad_id, np.int32)
        tokens[:, :C], tokens[:, C:C + len(ids)] = prompts, ids
        mask = np.zeros((R, K), np.int32)
        mask[:, :len(ids)] = 1
        return Samples(tokens=jnp.asarray(tokens), logprobs=jnp.asarray(-0.25 * mask, jnp.float32),
                       response_mask=jnp.asarray(mask))
    return sample_fn


def _rows(ep, r):
    """(real token ids, policy mask over them) of row r of `Episodes`."""
    real = np.asarray(ep.mask[r]) > 0
    policy = np.concatenate([np.zeros(ep.prompt_len, np.int32), np.asarray(ep.response_mask[r])])
    return [int(t) for t in np.asarray(ep.tokens[r])[real]], [int(m) for m in policy[real]]


def test_the_sequence_is_the_conversation_and_the_mask_covers_exactly_the_policy_turns():
    K, seen = 96, []
    replies = [BAD_CALL, CALL, "The answer is 5."]
    sampling = SamplingConfig(max_new_tokens=K, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    ro = rollout_episodes(_scripted(replies, K, seen), CalculatorEnv, [{"expression": "2 + 3"}], jax.random.key(0),
                          tokenizer=TOK, budget=EpisodeBudget(max_turns=5), sampling=sampling, prompt_len=512,
                          seq_len=1024, num_generations=2)
    schemas = CalculatorEnv().schemas
    messages = ro.messages[0]
    assert ro.messages[1] == messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[3]["content"].startswith("Error: malformed tool call") and messages[5]["content"] == "5"
    # The token-by-token sequence is the template's rendering of the whole conversation, and the policy mask is
    # its assistant mask: the replies with their EOS, never the tool results, the schemas or the headers.
    ids, loss_mask = encode_chat(TOK, list(messages), tools=schemas)
    for r in range(2):
        assert _rows(ro.episodes, r) == (ids, loss_mask)
    assert TOK.decode([t for t, m in zip(ids, loss_mask) if m]) == "".join(
        text + TOK.decode([TOK.eos_id]) for text in replies)
    # Each turn is sampled on the conversation so far, and the first prompt is the episode's prompt.
    for turn, (prompts, mask) in enumerate(seen):
        head = encode_prompt(TOK, list(messages[: 2 + 2 * turn]), tools=schemas)
        assert [int(t) for t in prompts[0][mask[0] > 0]] == head
    P = ro.episodes.prompt_len
    assert P == 512 and _rows(ro.episodes, 0)[0][: int(ro.episodes.mask[0, :P].sum())] == encode_prompt(
        TOK, list(messages[:2]), tools=schemas)
    lp = np.asarray(ro.episodes.sampler_logprobs)
    assert np.array_equal(lp != 0, np.asarray(ro.episodes.response_mask) > 0) and np.all(lp[lp != 0] == -0.25)
    assert list(ro.rewards) == [1.0, 1.0] and ro.finish == ("done", "done")
    metrics = rollout_metrics(ro)
    assert metrics["timing_s/gen"] >= 0 and metrics["timing_s/env"] > 0
    assert {k: v for k, v in metrics.items() if not k.startswith("timing_s/")} == {
        "tools/calls": 1.0, "tools/malformed_calls": 1.0, "turns/mean": 3.0, "episodes/done": 1.0,
        "episodes/max_len": 0.0}


def test_with_qwen2_5s_template_the_sequence_is_the_templates_rendering_up_to_the_last_end_of_turn(tmp_path):
    """Qwen2.5's own template (tool results inside user turns, a newline after each <|im_end|>) over GPT-2's BPE
    with the ChatML tokens: the rollout's ids and mask are encode_chat's (== transformers' apply_chat_template,
    tests/test_tools.py) of the whole conversation, up to the final reply's <|im_end|>."""
    from tokenizers import AddedToken, Tokenizer

    from rlhf_jax.tokenizer import HFTokenizer

    fixtures = Path(__file__).parent / "fixtures"
    with gzip.open(fixtures / "gpt2-tokenizer" / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
        bpe = Tokenizer.from_str(f.read())
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    shutil.copyfile(fixtures / "chat-templates" / "qwen2_5.jinja", tmp_path / "chat_template.jinja")
    tok = HFTokenizer.from_file(tmp_path)
    sampling = SamplingConfig(max_new_tokens=64, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ro = rollout_episodes(_scripted([BAD_CALL, CALL, "The answer is 5."], 64, [], tok), CalculatorEnv,
                          [{"expression": "2 + 3"}], jax.random.key(0), tokenizer=tok, budget=EpisodeBudget(),
                          sampling=sampling, prompt_len=400, seq_len=700)
    ids, mask = encode_chat(tok, list(ro.messages[0]), tools=CalculatorEnv().schemas)
    end = len(ids) - ids[::-1].index(tok.eos_id)
    assert ro.turns[0] == 3 and ids[end:] == tok.encode("\n")
    assert _rows(ro.episodes, 0) == (ids[:end], mask[:end])


def test_a_turn_cut_at_max_new_tokens_is_closed_unsampled_and_budgets_end_episodes():
    K, seen = 40, []
    sampling = SamplingConfig(max_new_tokens=K, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    ro = rollout_episodes(_scripted([CALL, "It is 1."], K, seen), CalculatorEnv, [{"expression": "1"}],
                          jax.random.key(0), tokenizer=TOK, budget=EpisodeBudget(max_turns=2), sampling=sampling,
                          prompt_len=512, seq_len=900)
    ids, mask = _rows(ro.episodes, 0)
    first = mask.index(1)
    assert ids[first:first + K + 1] == TOK.encode(CALL[:K]) + [TOK.eos_id]    # the closing EOS: not sampled
    assert mask[first:first + K + 1] == [1] * K + [0]
    assert list(ro.turns) == [2] and ro.finish == ("done",) and list(ro.malformed_calls) == [1]
    assert ro.messages[0][3]["content"].startswith("Error: malformed tool call: <tool_call> without its closing")
    with pytest.raises(ValueError, match="longer than the prompt bucket of 64"):
        rollout_episodes(_scripted(["x"], K, []), CalculatorEnv, [{"expression": "1"}], jax.random.key(0),
                         tokenizer=TOK, budget=EpisodeBudget(), sampling=sampling, prompt_len=64, seq_len=128)
    # A sequence that cannot hold another turn ends the episode ("max_len") before it is sampled.
    seen = []
    ro = rollout_episodes(_scripted([CALL, CALL, CALL], 96, seen), CalculatorEnv, [{"expression": "1"}],
                          jax.random.key(0), tokenizer=TOK, budget=EpisodeBudget(max_turns=3),
                          sampling=dataclasses.replace(sampling, max_new_tokens=96), prompt_len=512, seq_len=512 + 220)
    assert ro.finish == ("max_len",) and ro.turns[0] == len(seen) == 2
    ids, mask = _rows(ro.episodes, 0)
    assert ids[-1] == TOK.eos_id and mask[-1] == 1          # the sequence ends with the policy's last turn


class CountdownEnv:
    """Ends after task["turns"] policy turns (a user says "more" in between); reward = the number of turns."""

    def reset(self, task):
        self.left = task["turns"]
        return [{"role": "user", "content": "go"}]

    def step(self, messages):
        self.left -= 1
        if self.left == 0:
            return [], 1.0, True
        return [{"role": "user", "content": "more"}], 1.0, False


SHORT = ChatFormat(system_header="S:", user_header="U:", assistant_header="A:", tool_header="T:", tools_header="F:")


# The command's tiny settings; the library test below uses the same model, shapes and sampling, so that the two
# tests share the compiled sampler.
TINY = ["--model.num-layers", "1", "--model.max-seq-len", "560", "--data.seq-len", "496", "--env-max-len", "64",
        "--grpo.sampling.max-new-tokens", "8", "--data.num-demo", "4", "--checkpoint.no-tensorboard",
        "--grpo.batch-size", "2", "--grpo.num-generations", "2", "--grpo.completions-every", "0"]


def test_episodes_of_different_lengths_share_one_compiled_sampler_and_the_trainer_reproduces_its_logprobs():
    from rlhf_jax.cli.grpo import GRPOExperiment
    from rlhf_jax.config_cli import parse_cli
    from rlhf_jax.runner import init_model

    cfg = parse_cli(GRPOExperiment, ["--env", "calculator", *TINY])
    config = dataclasses.replace(cfg.grpo, num_steps=2)
    mc, params = init_model(cfg.preset, cfg.model, jax.random.key(0))
    P, T = cfg.data.seq_len, cfg.data.seq_len + cfg.env_max_len
    turn = make_turn_sampler(sampling=config.sampling, model_config=mc)
    compiled = sample_turn._cache_size()
    run = lambda tasks, seed: rollout_episodes(  # noqa: E731
        lambda p, m, k: turn(params, None, p, m, k), CountdownEnv, tasks, jax.random.key(seed), tokenizer=TOK,
        budget=EpisodeBudget(max_turns=4), sampling=config.sampling, prompt_len=P, seq_len=T, num_generations=2,
        chat_format=SHORT)
    ro, again = run([{"turns": 1}, {"turns": 3}], 0), run([{"turns": 2}, {"turns": 1}], 1)
    assert list(ro.turns) == [1, 1, 3, 3] and list(again.turns) == [2, 2, 1, 1]
    assert list(ro.rewards) == [1, 1, 3, 3]
    assert sample_turn._cache_size() - compiled <= 1                   # every turn of both rollouts: one program
    assert ro.episodes.tokens.shape == again.episodes.tokens.shape == (4, T)
    assert ro.episodes.response_mask.shape == (4, T - P)
    resp = np.asarray(ro.episodes.response_mask)
    starts = np.sum(np.diff(np.concatenate([np.zeros((4, 1), int), resp], axis=1)) == 1, axis=1)
    assert list(starts) == list(ro.turns)                               # one masked run of tokens per turn
    assert np.all(np.asarray(ro.episodes.mask)[:, P:] >= resp)
    # Token in, token out: each turn was sampled on exactly the prefix the trainer sees, so the trainer's forward
    # over the built sequences gives the sampler's log-probs (the update's "old" log-probs, TIS's denominator).
    logprobs = jax.jit(episode_logprobs, static_argnames=("model_config", "temperature"))
    for r in (ro, again):
        lp = logprobs(params, r.episodes, model_config=mc, temperature=config.sampling.temperature)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(r.episodes.sampler_logprobs), atol=1e-4)


def test_keeping_the_kv_cache_across_turns_samples_the_episodes_that_re_prefilling_does():
    from rlhf_jax.cli.grpo import GRPOExperiment
    from rlhf_jax.config_cli import parse_cli
    from rlhf_jax.runner import init_model

    cfg = parse_cli(GRPOExperiment, ["--env", "calculator", *TINY])
    mc, params = init_model(cfg.preset, cfg.model, jax.random.key(0))
    sampling, P, T, Q = cfg.grpo.sampling, cfg.data.seq_len, cfg.data.seq_len + cfg.env_max_len, 12
    prefill = make_turn_sampler(sampling=sampling, model_config=mc)
    tasks = [{"turns": 1}, {"turns": 4}, {"turns": 2}]

    def run(suffix_len, spare=0):
        if suffix_len is None:
            fn = lambda p, m, k: prefill(params, None, p, m, k)  # noqa: E731
        else:
            slots = spare + conversation_slots(prompt_len=P, max_new_tokens=sampling.max_new_tokens, max_turns=4,
                                               suffix_len=suffix_len)
            cached = make_turn_sampler(sampling=sampling, model_config=mc, conversation_slots=slots)
            fn = lambda c, p, m, k: cached(params, None, c, p, m, k)  # noqa: E731
        return rollout_episodes(fn, CountdownEnv, tasks, jax.random.key(3), tokenizer=TOK,
                                budget=EpisodeBudget(max_turns=4), sampling=sampling, prompt_len=P, seq_len=T,
                                num_generations=2, chat_format=SHORT, suffix_len=suffix_len)

    again, kept = run(None), run(Q)
    assert list(kept.turns) == list(again.turns) == [1, 1, 4, 4, 2, 2] and kept.finish == again.finish
    # Each turn's samples are drawn with the same keys from logits equal up to float rounding: the same tokens
    # (one row may flip a near-tie), and the trainer's forward over the built sequences gives the cached sampler's
    # log-probs, so positions and masks across the padding between turns are those of the whole context.
    same = [bool(np.array_equal(kept.episodes.tokens[r], again.episodes.tokens[r])) for r in range(6)]
    assert sum(same) >= 5, same
    lp = jax.jit(episode_logprobs, static_argnames=("model_config", "temperature"))(
        params, kept.episodes, model_config=mc, temperature=sampling.temperature)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(kept.episodes.sampler_logprobs), atol=1e-4)
    # A suffix longer than its bucket ends the episode ("max_len"), as a context longer than seq_len does.
    short = run(4)
    assert set(short.finish) == {"done", "max_len"} and list(short.turns) == [1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="fewer than the"):     # a sampler whose conversation is too short
        run(Q, spare=-1)


def test_grpo_env_command_runs_and_refuses_bad_options_in_one_line(tmp_path, capsys):
    from rlhf_jax.cli import grpo

    assert grpo.main(["--out", str(tmp_path / "run"), "--env", "calculator", "--grpo.num-steps", "2", *TINY,
                      "--grpo.completions-every", "2"]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "grpo" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        assert {"tools/calls", "tools/malformed_calls", "turns/mean", "reward", "loss", "timing_s/gen",
                "timing_s/env"} <= set(x)
        assert x["sampler/logprob_mismatch"] < 1e-4 and 1 <= x["turns/mean"] <= 4
    rows = [json.loads(x) for x in open(tmp_path / "run" / "grpo" / "completions.jsonl")]
    assert rows and all(r["step"] == 2 for r in rows)
    for r in rows:                   # the whole conversation: the opening messages, then the policy's turns
        chat = r["conversation"]
        assert [m["role"] for m in chat[:3]] == ["system", "user", "assistant"]
        assert chat[1]["content"].startswith("What is ") and chat[2]["content"] in r["completion"]
    assert (tmp_path / "run" / "grpo" / "final" / "model_config.json").exists()
    capsys.readouterr()
    for bad, says in [(["--env", "nope"], "environment 'nope': expected a registered name"),
                      (["--env", "calculator", "--mesh", "1", "1", "1"], "--env runs on one device"),
                      (["--env", "calculator", "--reward", "gsm8k"], "--env: the environment gives the rewards"),
                      (["--env", "calculator", "--data.seq-len", "64"], "longer than --data.seq-len 64"),
                      (["--env", "calculator", *TINY[:6], "--env-kv-suffix", "0"],
                       "--env-kv-suffix must be a positive")]:
        assert grpo.main(["--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err


def test_ppo_over_environment_episodes():
    """`stages.run_ppo_env`: PPO on multi-turn episodes (values from the policy, GAE across turns) runs on the same
    compiled sampler, scores each episode by its summed environment reward, and refuses a reward-model value."""
    from rlhf_jax.cli.grpo import GRPOExperiment
    from rlhf_jax.config_cli import parse_cli
    from rlhf_jax.runner import init_model
    from rlhf_jax.train import stages
    from rlhf_jax.train.ppo import PPOConfig, init_ppo_state

    cfg = parse_cli(GRPOExperiment, ["--env", "calculator", *TINY])
    mc, params = init_model(cfg.preset, cfg.model, jax.random.key(0))
    P, T = cfg.data.seq_len, cfg.data.seq_len + cfg.env_max_len
    pcfg = PPOConfig(num_steps=2, batch_size=2, num_epochs=1, num_minibatches=2, value_init="policy",
                     sampling=cfg.grpo.sampling, log_every=1)
    run = lambda state, config: stages.run_ppo_env(  # noqa: E731
        state, iter([[{"turns": 1}, {"turns": 3}], [{"turns": 2}, {"turns": 2}]]), config, model_config=mc,
        env_factory=CountdownEnv, tokenizer=TOK, budget=EpisodeBudget(max_turns=4), prompt_len=P, seq_len=T,
        ref_params=params, chat_format=SHORT)
    state, hist = run(init_ppo_state(params, pcfg, model_config=mc, rng=jax.random.key(1)), pcfg)
    assert int(state.step) == 2 and [h["turns/mean"] for h in hist] == [2.0, 2.0]
    for h in hist:
        assert h["objective/scores"] == pytest.approx(2.0)               # rewards 1 and 3, then 2 and 2
        assert np.isfinite(h["loss/policy"]) and np.isfinite(h["loss/value"])
    with pytest.raises(ValueError, match="value_init='policy'"):
        run(state, dataclasses.replace(pcfg, value_init="reward"))


def test_ppo_env_command_runs_and_refuses_bad_options_in_one_line(tmp_path, capsys):
    from rlhf_jax.cli import ppo

    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "560", "--data.seq-len", "496", "--env-max-len", "64",
            "--ppo.sampling.max-new-tokens", "8", "--data.num-demo", "4", "--checkpoint.no-tensorboard",
            "--ppo.batch-size", "2", "--ppo.num-minibatches", "2", "--ppo.num-epochs", "1",
            "--ppo.completions-every", "0"]
    assert ppo.main(["--out", str(tmp_path / "run"), "--env", "calculator", "--ppo.num-steps", "2", *tiny]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "ppo" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        assert {"tools/calls", "turns/mean", "objective/scores", "loss/policy", "loss/value"} <= set(x)
    assert (tmp_path / "run" / "ppo" / "final" / "model_config.json").exists()
    # With LoRA: adapters trained over the frozen base (also the KL reference), written as a peft adapter; the
    # rollouts keep the KV cache across turns.
    assert ppo.main(["--out", str(tmp_path / "lora"), "--env", "calculator", "--ppo.num-steps", "1", *tiny,
                     "--lora.rank", "2", "--lora.targets", "q", "v", "--env-kv-suffix", "128"]) == 0
    assert json.loads(open(tmp_path / "lora" / "ppo" / "metrics.jsonl").readline())["turns/mean"] >= 1
    from rlhf_jax.lora import load_peft
    from rlhf_jax.train.checkpoint import load_params
    mc, _ = load_params(str(tmp_path / "lora" / "ppo" / "final"))
    adapters, lora = load_peft(str(tmp_path / "lora" / "ppo" / "adapter"), mc)
    assert lora.rank == 2 and float(np.abs(np.asarray(adapters["attn"]["q"]["b"])).max()) > 0     # B moved from 0
    capsys.readouterr()
    for bad, says in [(["--env", "calculator", "--reward-init", "x"], "--env: the environment gives the rewards"),
                      (["--env", "calculator", "--data.seq-len", "64"], "longer than --data.seq-len 64")]:
        assert ppo.main(["--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err


def test_the_calculator_worlds_demonstrations_are_the_episodes_a_policy_writes():
    """A policy that writes the assistant turns of a calculator-world demonstration produces, token for token, the
    sequence and loss mask SFT trains on, and earns the reward; a carry-dropping direct answer earns nothing."""
    from rlhf_jax.recipes import tool_world
    from rlhf_jax.tasks import skills

    task = skills.task_of("add", "47 85")
    trace = tool_world.calculator_trace(task)
    ids, loss_mask = encode_chat(TOK, trace)
    turns, current = [], []
    for t, m in zip(ids, loss_mask):
        if m:
            current.append(t)
            if t == TOK.eos_id:
                turns.append(TOK.decode(current[:-1]))
                current = []
    assert len(turns) == 2 and turns[1] == "132" and '"expression": "47+85"' in turns[0]
    sampling = SamplingConfig(max_new_tokens=tool_world.MAX_NEW_TOKENS, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    run = lambda replies: rollout_episodes(  # noqa: E731
        _scripted(replies, tool_world.MAX_NEW_TOKENS, []), tool_world.environment,
        [tool_world.calculator_task(task)], jax.random.key(0), tokenizer=TOK, budget=tool_world.BUDGET,
        sampling=sampling, prompt_len=tool_world.PROMPT_LEN, seq_len=tool_world.SEQ_LEN)
    ro = run(turns)
    assert _rows(ro.episodes, 0) == (ids, loss_mask)
    assert list(ro.rewards) == [1.0] and list(ro.tool_calls) == [1] and ro.finish == ("done",)
    assert ro.messages[0][2] == {"role": "tool", "name": "calculate", "content": "132"}
    dropped = skills.demonstrate("drop_carry", task)
    assert dropped == "22" and list(run([dropped]).rewards) == [0.0]
    # The mix: calculator traces on about `trace_fraction` of the demonstrations, direct answers on the rest.
    cfg = tool_world.world_config(0, quick=True, eval_split="dev")
    tasks = skills.skill_set(["add"], 400, 3, "train", skills.RULE_WORLD)
    mixed = tool_world.demonstrations(tasks, cfg, trace_fraction=0.25, seed=1)
    traces = [len(r.messages) == 4 for r in mixed]
    assert 0.18 < np.mean(traces) < 0.32
    for r, t, trace in zip(mixed, tasks, traces):  # a direct answer: the right sum or the carry-dropping one
        if not trace:
            assert r.messages[0]["content"] == t.prompt and len(r.messages) == 2
            assert r.messages[1]["content"] in (t.answer, skills.demonstrate("drop_carry", t))
    assert not any(len(r.messages) == 4 for r in tool_world.demonstrations(tasks[:50], cfg, trace_fraction=0.0, seed=1))


def test_calculator_world_quick_writes_its_card(tmp_path):
    """experiments.calculator_world --quick: the world's models (pretraining corpus with calculator traces), GRPO
    over calculator episodes, greedy reads of both policies and a card."""
    from experiments import calculator_world
    from rlhf_jax.recipes import tool_world
    from rlhf_jax.recipes.cards import render_card

    docs = tool_world.corpus(tool_world.world_config(0, quick=True), corpus_traces=0.5)
    traces = [TOK.decode(list(d.ids)) for d in docs if "<tool_call>" in TOK.decode(list(d.ids))]
    assert 0.3 < len(traces) / len(docs) < 0.6
    out = str(tmp_path / "calc")
    calculator_world.main(["--quick", "--models", out, "--seeds", "0", "--eval-split", "dev", "--out", out])
    seed0 = json.load(open(Path(out) / "calculator_world.json"))["per_seed"][0]
    for arm in ("sft", "grpo"):
        assert len(seed0[arm]["solved"]) == len(seed0[arm]["called"]) == 16
        assert 1.0 <= seed0[arm]["turns"] <= tool_world.BUDGET.max_turns
    assert len(seed0["train"]["reward"]) == 2
    assert "GRPO - SFT, episodes calling the tool" in render_card(json.load(open(Path(out) / "card.json")))


def test_retry_demonstrations_go_on_only_after_a_wrong_answer_as_the_environment_does():
    from rlhf_jax.envs import SkillRetryEnv, run_episode
    from rlhf_jax.recipes import rule_world
    from rlhf_jax.tasks import skills

    cfg = rule_world.RuleWorldConfig(quick=True)
    tasks = skills.skill_set(["reverse"], 300, 2, "train", skills.RULE_WORLD)
    records = rule_world.retry_demonstrations(tasks, cfg, trace_fraction=0.5, seed=0)
    wrong = []
    for r, t in zip(records, tasks):
        m = r.messages
        assert m[0] == {"role": "user", "content": t.prompt} and len(m) in (2, 4)
        if m[1]["content"] != t.answer:
            wrong.append(len(m) == 4)
        if len(m) == 4:                 # the environment's own conversation, and a demonstrator right at the second
            assert m[1]["content"] != t.answer and m[3]["content"] == t.answer
            replies = iter([m[1]["content"], m[3]["content"]])
            episode = run_episode(SkillRetryEnv(), {"op": t.op, "key": t.key}, lambda _: (next(replies), 1))
            assert list(episode.messages) == list(m) and episode.reward == 1.0
    assert len(wrong) > 50 and 0.35 < np.mean(wrong) < 0.65


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_no_gradient_reaches_tool_results_user_turns_or_template_tokens(loss_type):
    """The GRPO loss over a calculator episode (a call, its result, the answer) has a gradient on the logits
    exactly at the policy's sampled tokens, the positions the template's assistant mask names, and nowhere on the
    tool result, the user turn or the headers, even with an advantage on every position."""
    from rlhf_jax.losses import policy_gradient_loss, token_logprobs
    from rlhf_jax.models import ModelConfig, init_params
    from rlhf_jax.recipes import tool_world
    from rlhf_jax.tasks import skills
    from rlhf_jax.train.rl import episode_logits

    task = skills.task_of("add", "47 85")
    ids, loss_mask = encode_chat(TOK, tool_world.calculator_trace(task))
    replies = ['<tool_call>\n{"name": "calculate", "arguments": {"expression": "47+85"}}\n</tool_call>', "132"]
    sampling = SamplingConfig(max_new_tokens=tool_world.MAX_NEW_TOKENS, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    ep = rollout_episodes(_scripted(replies, tool_world.MAX_NEW_TOKENS, []), tool_world.environment,
                          [tool_world.calculator_task(task)] * 2, jax.random.key(0), tokenizer=TOK,
                          budget=tool_world.BUDGET, sampling=sampling, prompt_len=tool_world.PROMPT_LEN,
                          seq_len=tool_world.SEQ_LEN).episodes
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                     max_seq_len=tool_world.SEQ_LEN)
    logits = episode_logits(init_params(mc, jax.random.key(1)), ep, model_config=mc)
    old = jax.lax.stop_gradient(token_logprobs(logits, ep.responses))
    advantages = jnp.ones_like(old).at[1].set(-1.0)          # every position, so only the mask can zero one

    def loss(z):
        return policy_gradient_loss(token_logprobs(z, ep.responses), old, advantages, ep.response_mask,
                                    loss_type=loss_type)[0]
    reached = np.asarray(jnp.any(jax.grad(loss)(logits) != 0, axis=-1))           # [rows, N]
    P, L = ep.prompt_len, len(ids)
    first = int(np.asarray(ep.mask[0, :P]).sum())
    expected = np.zeros(ep.responses.shape[1], bool)
    expected[: L - first] = np.asarray(loss_mask[first:]) > 0                      # the assistant turns, with EOS
    assert expected.sum() == len(TOK.encode(replies[0])) + len(TOK.encode(replies[1])) + 2
    for r in range(2):
        assert np.array_equal(reached[r], expected)

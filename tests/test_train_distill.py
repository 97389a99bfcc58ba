"""The distillation stage: the loss falls toward a fixed teacher of another size (lambda 0), the on-policy reverse-KL
reward runs (lambda 1), a mesh of 8 simulated devices equals one device, the command trains a LoRA student
against a top-k teacher with lambda 0.5, a teacher of another vocabulary is refused, and SFT batches
become prompts and dataset responses."""
import jax
import numpy as np
import pytest

from rlhf_jax import sharding as S
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.train import OptimConfig, create_train_state
from rlhf_jax.train.distill import DistillConfig, run_distill, sft_to_distill_batch

STUDENT = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=32)
TEACHER = ModelConfig.preset("tiny", d_model=48, num_layers=2, num_heads=2, mlp_dim=96, max_seq_len=32)
B, P, N, PAD = 4, 4, 4, 256


@pytest.fixture(scope="module")
def models():
    """(student, teacher) params; the teacher's final norm is scaled 30x: a sharp teacher, far from the student's
    near-uniform start, so that there is something to learn."""
    teacher = jax.device_get(init_params(TEACHER, jax.random.key(1)))
    teacher["final_norm"]["scale"] = teacher["final_norm"]["scale"] * 30.0
    return jax.device_get(init_params(STUDENT, jax.random.key(0))), teacher


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    pm = (np.arange(P)[None] >= np.array([0, 1, 2, 0])[:, None]).astype(np.int32)          # left padded
    rm = (np.arange(N)[None] < np.array([4, 2, 3, 1])[:, None]).astype(np.int32)           # right padded
    return {"prompts": np.where(pm > 0, rng.integers(97, 123, (B, P)), PAD).astype(np.int32), "prompt_mask": pm,
            "responses": np.where(rm > 0, rng.integers(97, 123, (B, N)), PAD).astype(np.int32), "response_mask": rm}


def _config(**kw):
    base = dict(num_steps=2, log_every=1, batch_size=B, max_prompt_len=P, temperature=1.0,
                sampling=SamplingConfig(max_new_tokens=N), optim=OptimConfig(learning_rate=1e-2))
    return DistillConfig(**{**base, **kw})


def _run(models, config, batches, **kw):
    student, teacher = models
    state = create_train_state(student, config.optim, 0)
    return run_distill(state, batches, config, model_config=STUDENT, **{"teacher_params": teacher,
                                                                        "teacher_config": TEACHER, **kw})


SUPERVISED = _config(num_steps=4, lmbda=0.0, beta=0.3, optim=OptimConfig(learning_rate=3e-2, eps=1e-3))


@pytest.fixture(scope="module")
def one_device(models):
    """A supervised KD run (lambda 0) on one device, shared by two tests."""
    state, hist = _run(models, SUPERVISED, [_batch()] * SUPERVISED.num_steps)
    return jax.device_get(state.params), hist


def test_loss_falls_toward_a_fixed_teacher_of_another_size(one_device):
    _, hist = one_device
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and all(h["on_policy"] == 0.0 for h in hist)
    losses = [h["loss"] for h in hist]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert hist[-1]["kl_forward"] < 0.75 * hist[0]["kl_forward"], [h["kl_forward"] for h in hist]
    assert hist[-1]["kl_reverse"] < hist[0]["kl_reverse"] and all(h["grad_norm"] > 0 for h in hist)


def test_on_policy_reverse_kl_reward_runs(models):
    config = _config(num_steps=3, lmbda=1.0, objective="kl_reward")
    _, hist = _run(models, config, [_batch()] * 3)
    assert len(hist) == 3 and all(h["on_policy"] == 1.0 for h in hist)
    for h in hist:
        assert all(np.isfinite(v) for v in h.values())
        assert h["kl_reverse"] > 0 and h["completions/mean_length"] > 0
        assert h["reward"] < 0                  # the mean reward estimates -KL(student || teacher)
    with pytest.raises(ValueError, match="lmbda = 1"):
        _config(lmbda=0.5, objective="kl_reward")
    with pytest.raises(ValueError, match="teacher_topk"):
        _config(lmbda=1.0, objective="kl_reward", teacher_topk=5)


def test_mesh_of_eight_devices_equals_one_device(models, one_device):
    ref_params, ref_hist = one_device
    state, hist = _run(models, SUPERVISED, [_batch()] * SUPERVISED.num_steps, mesh=S.make_mesh((2, 2, 2)))
    for g, w in zip(hist, ref_hist):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-6, err_msg=f"step {w['step']} {k}")
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    assert tuple(state.params["layers"]["mlp"]["up"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")


def test_a_teacher_of_another_vocabulary_is_refused(models):
    other = ModelConfig.preset("tiny", vocab_size=300, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="300 tokens but the student's has 259"):   # refused before any work
        _run(models, _config(), [_batch()], teacher_config=other)


def test_sft_batches_become_prompts_and_dataset_responses():
    # ids: [p p p | r r E] with a second row of two turns [p | a a | p | r E]: the response is the last run.
    ids = np.array([[1, 2, 3, 7, 8, 9, 0], [1, 5, 6, 2, 7, 9, 0]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1, 0]])
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask[:, 1:].astype(np.float32)}
    out = sft_to_distill_batch(batch, max_prompt_len=3, max_new_tokens=2, pad_id=PAD)
    np.testing.assert_array_equal(out["prompts"], [[1, 2, 3], [5, 6, 2]])
    np.testing.assert_array_equal(out["prompt_mask"], [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(out["responses"], [[7, 8], [7, 9]])          # cut to max_new_tokens
    wide = sft_to_distill_batch(batch, max_prompt_len=6, max_new_tokens=4, pad_id=PAD)
    np.testing.assert_array_equal(wide["prompts"][0], [PAD, PAD, PAD, 1, 2, 3])
    np.testing.assert_array_equal(wide["responses"], [[7, 8, 9, PAD], [7, 9, PAD, PAD]])
    np.testing.assert_array_equal(wide["response_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="packed"):
        sft_to_distill_batch({**batch, "segment_ids": np.array([[1, 1, 1, 2, 2, 2]] * 2)}, max_prompt_len=3,
                             max_new_tokens=2, pad_id=PAD)


def test_command_trains_a_lora_student_and_refuses_a_teacher_of_another_vocabulary(models, tmp_path, capsys):
    """GKD's mix (lambda 0.5: both branches in one program) of a LoRA student against a top-k teacher, through the
    command; then a teacher of another vocabulary is one line, exit 2, before the run starts."""
    import json

    from rlhf_jax.cli import distill
    from rlhf_jax.train.checkpoint import save_params

    save_params(tmp_path / "teacher", models[1], model_config=TEACHER)
    argv = ["--out", str(tmp_path / "run"), "--teacher", str(tmp_path / "teacher"), "--model.d-model", "32",
            "--model.num-layers", "1", "--model.num-heads", "2", "--model.mlp-dim", "64", "--model.max-seq-len", "32",
            "--data.num-demo", "8", "--data.seq-len", "32", "--distill.batch-size", "2", "--distill.log-every", "1",
            "--distill.max-prompt-len", "24", "--distill.sampling.max-new-tokens", "4", "--distill.lmbda", "0.5",
            "--distill.beta", "0.5", "--distill.temperature", "1.0", "--checkpoint.save-every", "2",
            "--checkpoint.no-tensorboard", "--lora.rank", "2", "--distill.teacher-topk", "5"]
    assert distill.main([*argv, "--distill.num-steps", "4"]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "distill" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert sorted({x["on_policy"] for x in lines}) == [0.0, 1.0]          # the coin came up both ways
    assert all(np.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in lines)
    assert {"loss", "kl_forward", "kl_reverse", "on_policy", "grad_norm", "learning_rate"} <= set(lines[0])
    assert (tmp_path / "run" / "distill" / "final" / "model_config.json").exists()
    other = ModelConfig.preset("tiny", vocab_size=300, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    save_params(tmp_path / "wide", init_params(other, jax.random.key(2)), model_config=other)
    capsys.readouterr()
    argv[1] = str(tmp_path / "refused")
    assert distill.main([*argv[:2], "--teacher", str(tmp_path / "wide"), *argv[4:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "300 tokens but the student's has 259" in err, err
    assert not (tmp_path / "refused" / "config.json").exists()
    assert distill.main([*argv[:2], "--teacher", str(tmp_path / "nowhere"), *argv[4:]]) == 2
    assert capsys.readouterr().err == f"error: --teacher {tmp_path / 'nowhere'}: no such folder\n"
    assert distill.main([*argv[:2], *argv[4:]]) == 2
    assert capsys.readouterr().err.startswith("error: --teacher DIR is required")

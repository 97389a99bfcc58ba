"""Experiment command lines: --help with defaults, JSON configs with clear errors, range checks, a tiny SFT run
with --resume, and SIGTERM handling of the run wrapper."""
import dataclasses
import json
import os
import shutil
import signal
import re
import subprocess
import sys
import time
from typing import Literal

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config_cli import ConfigError, check_ranges, config_from_dict, load_json_config, parse_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
       "CI": "1"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Optim:
    learning_rate: float = 1e-3
    """Peak learning rate."""
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        check_ranges(self, positive=("learning_rate", "max_grad_norm"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Stage:
    beta: float = 0.1
    """DPO beta."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    optim: _Optim = _Optim()

    def __post_init__(self):
        check_ranges(self, positive=("beta",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Exp:
    """A test experiment."""

    out: str = "runs/x"
    """Run directory."""
    resume: bool = False
    seed: int = 0
    buckets: tuple[int, ...] = (64, 128)
    stage: _Stage = _Stage()

    def __post_init__(self):
        check_ranges(self, non_negative=("seed",))


def _write(tmp_path, obj, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_json_config_nested_values_and_types(tmp_path):
    path = _write(tmp_path, {"seed": 3, "buckets": [32], "stage": {"beta": 1, "optim": {"max_grad_norm": None}}})
    cfg = load_json_config(path, _Exp())
    assert cfg == _Exp(seed=3, buckets=(32,), stage=_Stage(beta=1.0, optim=_Optim(max_grad_norm=None)))
    assert isinstance(cfg.stage.beta, float)


@pytest.mark.parametrize("data, expected", [
    ({"stage": {"optim": {"learnin_rate": 1.0}}},
     ["cfg.json", "unknown key 'stage.optim.learnin_rate'", "learning_rate, max_grad_norm"]),
    ({"sed": 1}, ["unknown key 'sed'", "buckets, out, resume, seed, stage"]),
    ({"seed": "3"}, ["key 'seed' = '3'", "expected int"]),
    ({"stage": {"beta": True}}, ["key 'stage.beta'", "expected float"]),
    ({"stage": {"loss_type": "hinge"}}, ["stage.loss_type", "'sigmoid', 'ipo'"]),
    ({"stage": 3}, ["key 'stage' = 3", "expected _Stage", "beta, loss_type, optim"]),
])
def test_json_config_errors_name_file_key_and_expectation(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_json_config(path, _Exp())
    for piece in expected:
        assert piece in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"seed": 1,}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 1"):
        load_json_config(p, _Exp())
    with pytest.raises(ConfigError, match="file not found"):
        load_json_config(tmp_path / "nope.json", _Exp())


def test_configs_check_their_own_ranges_naming_the_field():
    _Exp()
    for make, message in [(lambda: _Optim(learning_rate=-1e-3), "_Optim: learning_rate = -0.001 must be > 0"),
                          (lambda: _Stage(beta=0.0), "_Stage: beta = 0.0 must be > 0"),
                          (lambda: _Exp(seed=-1), "_Exp: seed = -1 must be >= 0"),
                          (lambda: _Optim(learning_rate=float("nan")), "learning_rate = nan must be a finite number")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make()
    _Optim(max_grad_norm=None)                                                # None skips the check
    with pytest.raises(ConfigError, match=r"cfg.json: stage: _Stage: beta = -1.0 must be > 0"):
        config_from_dict(_Exp(), {"stage": {"beta": -1}}, source="cfg.json")


def test_parse_cli_json_then_flags_then_validation(tmp_path, capsys):
    path = _write(tmp_path, {"seed": 5, "stage": {"beta": 0.5}})
    cfg = parse_cli(_Exp, ["--config", path, "--stage.optim.learning-rate", "0.01", "--out", "o", "--resume"])
    assert cfg == _Exp(out="o", resume=True, seed=5, stage=_Stage(beta=0.5, optim=_Optim(learning_rate=0.01)))
    # flags win over the JSON file wherever --config appears
    assert parse_cli(_Exp, ["--seed", "7", f"--config={path}"]).seed == 7
    with pytest.raises(SystemExit) as e:
        parse_cli(_Exp, ["--stage.beta", "-0.2"])
    assert e.value.code == 2 and "error: --stage.*: _Stage: beta = -0.2 must be > 0" in capsys.readouterr().err
    bad = _write(tmp_path, {"stage": {"bta": 1}}, "bad.json")
    with pytest.raises(SystemExit):
        parse_cli(_Exp, ["--config", bad])
    err = capsys.readouterr().err
    assert "bad.json" in err and "'stage.bta'" in err and "beta, loss_type, optim" in err


def test_help_lists_json_defaults(tmp_path, capsys):
    path = _write(tmp_path, {"stage": {"beta": 0.25}})
    with pytest.raises(SystemExit) as e:
        parse_cli(_Exp, ["--config", path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--stage.beta" in out and "0.25" in out and "--config FILE.json" in out


def _flat(text):
    """Help text without tyro's box-drawing frame, whitespace collapsed (options wrap across lines)."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def _help_text(module, capsys):
    mod = __import__(f"rlhf_jax.cli.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    return _flat(capsys.readouterr().out)


@pytest.mark.parametrize("module, options", [
    ("reward", ["--reward.center-coef FLOAT", "--init {None}|STR", "(default: runs/reward)"]),
    ("dpo", ["--dpo.beta FLOAT", "--dpo.loss-type {sigmoid,robust,hinge,ipo,simpo,orpo}", "(default: sigmoid)",
             "--dpo.simpo-gamma FLOAT", "--dpo.orpo-lambda FLOAT"]),
    ("online_dpo", ["--judge STR", "--online-dpo.num-generations INT", "--online-dpo.ref-refresh-every INT",
                    "--online-dpo.loss-type {sigmoid,robust,hinge,ipo}", "--online-dpo.pairs-every INT"]),
    ("kto", ["--kto.beta FLOAT", "--kto.desirable-weight FLOAT", "--kto.undesirable-weight FLOAT",
             "--data.kind {None}|STR", "(default: runs/kto)"]),
    ("ppo", ["--init {None}|STR", "--reward-init", "--ppo.clip-eps FLOAT", "--ppo.kl-coef FLOAT", "(default: 0.2)",
             "--ppo.value-optim.learning-rate FLOAT"]),
    ("distill", ["--teacher {None}|STR", "--distill.lmbda FLOAT", "--distill.beta FLOAT",
                 "--distill.temperature FLOAT", "--distill.objective {divergence,kl_reward}"]),
    ("grpo", ["--reward STR", "--grpo.num-generations INT", "--grpo.clip-eps-high {None}|FLOAT",
              "--grpo.loss-type {grpo,dapo,dr_grpo,gspo,cispo}", "--grpo.advantage", "--grpo.kl-in {loss,reward}",
              "--grpo.sampling.temperature FLOAT"]),
])
def test_help_of_each_script_lists_options_with_defaults(module, options, capsys):
    text = _help_text(module, capsys)
    for opt in options + ["--out STR", "--resume, --no-resume", "--model.num-layers", "--data.path",
                          "--checkpoint.save-every INT", "--config FILE.json"]:
        assert opt in text, opt
    assert text.count("(default:") >= 30  # every option shows its default


def test_rlhf_jax_dispatches_every_command_and_refuses_unknown_ones(capsys):
    """`rlhf-jax NAME ...` runs rlhf_jax.cli.NAME's main (each listed command's help names it as its prog);
    no command or an unknown one prints the command list, the latter with exit 2."""
    from rlhf_jax import cli
    assert set(cli.COMMANDS) >= {"sft", "reward", "ppo", "dpo", "kto", "online-dpo", "grpo", "export", "generate",
                                 "benchmark", "pipeline", "seeds"}
    assert cli.main(["--help"]) == 0 and "online-dpo" in capsys.readouterr().out
    assert cli.main(["sfd"]) == 2
    err = capsys.readouterr().err
    assert "no command 'sfd'" in err and "pipeline" in err
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: rlhf-jax {name} "), (name, out[:80])
        assert "{" not in out.splitlines()[0], out.splitlines()[0]   # options only: no tyro subcommands


def test_sft_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--help"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: rlhf-jax sft ")
    text = _flat(r.stdout)
    for opt in ["--out STR", "(default: runs/sft)", "--sft.num-steps INT", "(default: 150)",
                "--sft.optim.learning-rate FLOAT", "(default: 0.003)", "--data.batch-size INT"]:
        assert opt in text, opt


def _tiny_sft_argv(out: str, *, log_every: int, save_every: int) -> list[str]:
    """`rlhf-jax sft` on a 1-layer model and 16 demo conversations (without --sft.num-steps)."""
    return [sys.executable, "-m", "rlhf_jax.cli.sft", "--out", out, "--model.num-layers", "1",
            "--model.max-seq-len", "32", "--data.num-demo", "16", "--data.batch-size", "2", "--data.seq-len", "32",
            "--sft.log-every", str(log_every), "--checkpoint.save-every", str(save_every),
            "--sft.optim.warmup-steps", "1", "--checkpoint.no-tensorboard"]


def test_sft_smoke_run_and_resume(tmp_path):
    pytest.importorskip("rlhf_jax.train.stages", reason="stage functions not written yet")
    out = str(tmp_path / "run")
    base = _tiny_sft_argv(out, log_every=2, save_every=2)
    r = subprocess.run(base + ["--sft.num-steps", "4"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["sft"]["num_steps"] == 4 and saved["model"]["num_layers"] == 1
    r = subprocess.run(base + ["--sft.num-steps", "6", "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming sft from step 4" in r.stderr
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "sft", "metrics.jsonl"))]
    assert steps == [2, 4, 6]
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "sft"))) == ["4", "6"]
    assert os.path.exists(os.path.join(out, "sft", "final", "model_config.json"))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["summary"]["steps"] == 6 and np.isfinite(report["summary"]["final/loss"])
    assert os.path.exists(os.path.join(out, "sft_curves.png"))
    r = subprocess.run(base + ["--sft.num-steps", "6"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "already holds checkpoints" in r.stderr
    # --resume with other settings is refused, naming each changed key; config.json stays as it was.
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["sft"]["num_steps"] == 6
    r = subprocess.run(base + ["--sft.num-steps", "8", "--resume", "--sft.optim.learning-rate", "0.01",
                               "--data.num-demo", "17"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "sft.optim.learning_rate (0.003 -> 0.01)" in r.stderr and "data.num_demo (16 -> 17)" in r.stderr
    assert "sft.num_steps" not in r.stderr                           # training longer (or less) is allowed
    assert json.load(open(os.path.join(out, "config.json"))) == saved
    r = subprocess.run(base + ["--resume", "--out", str(tmp_path / "empty")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds no run to continue" in r.stderr, r.stderr[-3000:]


def test_sft_cli_sigterm_saves_exits_cleanly_and_resumes(tmp_path):
    """A SIGTERM sent to a running `rlhf-jax sft` (as a cluster scheduler does): the step in flight
    finishes, a checkpoint is written at that step, the process exits 143 without a final model (so that
    `sft && dpo` stops there), and --resume continues from exactly that step."""
    out = tmp_path / "run"
    base = _tiny_sft_argv(str(out), log_every=1, save_every=100000)
    proc = subprocess.Popen(base + ["--sft.num-steps", "100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "sft" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # compiled and stepping
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the SFT run did not start stepping within 240 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    stopped = re.search(r"stopped by signal after step (\d+); continue with the same command plus --resume", stderr)
    assert stopped, stderr[-3000:]
    n = int(stopped.group(1))
    assert n >= 2 and sorted(os.listdir(out / "checkpoints" / "sft")) == [str(n)]
    assert not (out / "sft" / "final").exists()
    assert json.load(open(out / "report.json"))["summary"]["finished"] is False
    r = subprocess.run(base + ["--sft.num-steps", str(n + 2), "--resume"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming sft from step {n}" in r.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, n + 3))  # every step once: none lost, none repeated
    assert (out / "sft" / "final" / "model_config.json").exists()


@flax.struct.dataclass
class _Counter:
    step: jnp.ndarray
    total: jnp.ndarray


class _Positions:
    def __init__(self):
        self.position = 0

    def state(self):
        return {"position": self.position}

    def restore(self, s):
        self.position = s["position"]


def test_run_stage_sigterm_checkpoints_and_resumes(tmp_path):
    from rlhf_jax.runner import CheckpointSpec, run_stage  # noqa: PLC0415

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Cfg:
        num_steps: int = 10

    def stage_fn(state, data, cfg, hooks):
        history = []
        for _ in range(cfg.num_steps):
            if hooks.should_stop():
                break
            data.position += 1
            state = _Counter(step=state.step + 1, total=state.total + float(data.position))
            step = int(state.step)
            history.append({"step": step, "loss": float(state.total)})
            hooks.on_step(step, history[-1])
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            hooks.on_state(step, state)
        hooks.finalize(int(state.step), state)
        return state, history

    spec = CheckpointSpec(save_every=100, tensorboard=False, progress=False)
    init = _Counter(step=jnp.array(0), total=jnp.array(0.0))
    state, hist, finished = run_stage("toy", stage_fn, init, _Positions(), Cfg(), out=str(tmp_path),
                                      resume=False, checkpoint=spec)
    assert not finished and [h["step"] for h in hist] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert os.listdir(tmp_path / "checkpoints" / "toy") == ["3"]
    data = _Positions()
    state, hist, finished = run_stage("toy", lambda s, d, c, hooks: _no_signal(s, d, c, hooks), init, data,
                                      Cfg(), out=str(tmp_path), resume=True, checkpoint=spec)
    assert finished and int(state.step) == 10 and data.position == 10
    assert float(state.total) == sum(range(1, 11))  # 1+...+10: resumed with the right state and data position


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path):
    """A run killed after its last checkpoint (SIGKILL: no save at the stop) logged steps the checkpoint has not
    seen; resuming replays them, and metrics.jsonl holds every step exactly once."""
    from rlhf_jax.runner import CheckpointSpec, run_stage  # noqa: PLC0415

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Cfg:
        num_steps: int = 10

    spec = CheckpointSpec(save_every=4, max_to_keep=5, tensorboard=False, progress=False)
    init = _Counter(step=jnp.array(0), total=jnp.array(0.0))
    run_stage("toy", _no_signal, init, _Positions(), Cfg(num_steps=6), out=str(tmp_path), resume=False,
              checkpoint=spec)
    for step in os.listdir(tmp_path / "checkpoints" / "toy"):   # as if killed after step 6, saved at step 4
        if step != "4":
            shutil.rmtree(tmp_path / "checkpoints" / "toy" / step)
    data = _Positions()
    state, _, finished = run_stage("toy", _no_signal, init, data, Cfg(), out=str(tmp_path), resume=True,
                                   checkpoint=spec)
    assert finished and int(state.step) == 10 and data.position == 10
    steps = [json.loads(line)["step"] for line in open(tmp_path / "toy" / "metrics.jsonl")]
    assert steps == list(range(1, 11))


def _no_signal(state, data, cfg, hooks):
    for _ in range(cfg.num_steps):
        data.position += 1
        state = _Counter(step=state.step + 1, total=state.total + float(data.position))
        hooks.on_step(int(state.step), {"loss": float(state.total)})
        hooks.on_state(int(state.step), state)
    hooks.finalize(int(state.step), state)
    return state, []


@pytest.mark.parametrize("module, argv, message", [
    # every config checks itself (__post_init__); the one-line error names the flags of its group
    ("dpo", ["--dpo.beta", "0"], "error: --dpo.*: DPOConfig: beta = 0.0 must be > 0"),
    ("ppo", ["--ppo.clip-eps", "-0.1"], "error: --ppo.*: PPOConfig: clip_eps = -0.1 must be > 0"),
    ("ppo", ["--ppo.gamma", "1.5"], "error: --ppo.*: PPOConfig: gamma = 1.5 must be in [0, 1]"),
    ("ppo", ["--ppo.sampling.top-p", "0"], "error: --ppo.sampling.*: SamplingConfig: top_p = 0.0 must be in (0, 1]"),
    ("sft", ["--sft.optim.learning-rate", "-1e-4"], "error: --sft.optim.*: OptimConfig: learning_rate = -0.0001"),
    ("sft", ["--seed", "-1"], "error: options: SFTExperiment: seed = -1 must be >= 0"),
])
def test_scripts_reject_out_of_range_values(module, argv, message, capsys, tmp_path):
    mod = __import__(f"rlhf_jax.cli.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        mod.main(argv + ["--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()  # rejected before anything is written


def test_grpo_script_runs_on_the_worlds_verifiable_reward_and_on_gsm8k(tmp_path):
    """The world's gold reward (host-side verifier, built-in prompts) and GSM8K final-answer checks on the real
    sample: both run, log the GRPO metrics and save final params; a setup mistake is one line and exit 2."""
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    common = ["--model.num-layers", "1", "--grpo.num-steps", "2", "--grpo.batch-size", "2", "--grpo.num-generations",
              "2", "--checkpoint.no-tensorboard", "--grpo.completions-every", "2"]
    runs = {"world": [], "gsm8k": ["--reward", "gsm8k", "--data.path", os.path.join(fixtures, "gsm8k-test-10.jsonl"),
                                   "--data.seq-len", "512", "--model.max-seq-len", "640"]}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli.grpo", "--out", out, *common, *extra], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = [json.loads(line) for line in open(os.path.join(out, "grpo", "metrics.jsonl"))]
        assert [x["step"] for x in lines] == [1, 2]
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio",
                    "clip_ratio/low_mean", "clip_ratio/high_mean", "sampler/logprob_mismatch"):
            assert key in lines[0], key
        table = [json.loads(line) for line in open(os.path.join(out, "grpo", "completions.jsonl"))]
        assert [t["step"] for t in table] == [2] * 4 and all(isinstance(t["completion"], str) for t in table)
        assert os.path.exists(os.path.join(out, "grpo", "final", "model_config.json"))
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli.grpo", "--out", str(tmp_path / "bad"), "--reward",
                        "model"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --reward model needs --reward-init (a reward model folder)"



def test_grpo_refuses_gsm8k_prompts_longer_than_the_prompt_bucket(tmp_path, capsys):
    """GSM8K questions longer than --data.seq-len would be cut from the front and their answers not found: the
    run is refused before any compile, in one line naming the longest prompt's length and the flag."""
    from rlhf_jax.cli import grpo
    data = os.path.join(ROOT, "tests", "fixtures", "gsm8k-test-10.jsonl")
    assert grpo.main(["--out", str(tmp_path / "run"), "--reward", "gsm8k", "--data.path", data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "longer than --data.seq-len 64" in err and "raise --data.seq-len to" in err, err


def test_lora_flags_train_adapters_resume_and_write_a_peft_adapter(tmp_path):
    """--lora.rank: the SFT script trains adapters (checkpoints hold them; --resume continues), writes the merged
    model to final/ and the adapters in peft's format to adapter/, which the export command copies out; PPO takes
    the flag too (policy and value adapters; the policy's are saved)."""
    out = str(tmp_path / "run")
    base = _tiny_sft_argv(out, log_every=1, save_every=1) + ["--lora.rank", "2", "--lora.targets", "q", "v"]
    r = subprocess.run(base + ["--sft.num-steps", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(base + ["--sft.num-steps", "3", "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "resuming sft from step 2" in r.stderr, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "sft", "metrics.jsonl"))] == [1, 2, 3]
    adapter = json.load(open(os.path.join(out, "sft", "adapter", "adapter_config.json")))
    assert adapter["r"] == 2 and adapter["target_modules"] == ["c_attn"]          # the tiny preset is GPT-2 style
    from rlhf_jax.lora import load_peft
    from rlhf_jax.train import checkpoint as ckpt
    mc, merged = ckpt.load_params(os.path.join(out, "sft", "final"))
    adapters, lora = load_peft(os.path.join(out, "sft", "adapter"), mc)
    assert set(adapters["attn"]) == {"q", "k", "v"} and float(np.abs(np.asarray(adapters["attn"]["q"]["b"])).max()) > 0
    from rlhf_jax.cli import export, ppo
    hf = tmp_path / "adapter_export"
    assert export.main([os.path.join(out, "sft", "final"), "--out", str(hf), "--what", "adapter"]) == 0
    assert json.loads((hf / "adapter_config.json").read_text()) == adapter and (hf / "adapter_model.safetensors").exists()
    assert ppo.main(["--out", str(tmp_path / "ppo"), "--lora.rank", "2", "--ppo.num-steps", "1", "--ppo.batch-size",
                     "2", "--ppo.num-minibatches", "1", "--ppo.sampling.max-new-tokens", "4", "--model.num-layers", "1",
                     "--data.seq-len", "48", "--checkpoint.no-tensorboard"]) == 0
    assert (tmp_path / "ppo" / "ppo" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "ppo" / "ppo" / "final" / "model_config.json").exists()


def test_kto_online_dpo_and_reference_free_preference_scripts_run_and_reject_bad_input(tmp_path, capsys):
    """KTO on the world's labelled pairs split into unpaired feedback, and on a feedback file; SimPO through the
    DPO script; online DPO judged by the world (gold agreement and pairs logged); a record with a non-boolean
    label, or a missing reward model, is one line (naming file, line and field), exit 2."""
    from rlhf_jax.cli import dpo, kto
    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "64", "--data.num-demo", "16", "--data.batch-size",
            "4", "--checkpoint.no-tensorboard"]
    assert kto.main(["--out", str(tmp_path / "kto"), "--kto.num-steps", "2", "--kto.log-every", "1",
                     "--kto.optim.warmup-steps", "1", *tiny]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "kto" / "kto" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and {"kl", "rewards/chosen", "rewards/rejected"} <= set(lines[0])
    assert (tmp_path / "kto" / "kto" / "final" / "model_config.json").exists()
    feedback = tmp_path / "fb.jsonl"
    rows = [{"prompt": "hi", "completion": "hello", "label": True}, {"prompt": "hi", "completion": "go", "label": 0}]
    feedback.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    capsys.readouterr()
    assert kto.main(["--out", str(tmp_path / "bad"), "--data.path", str(feedback), *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {feedback}:2: field 'label': expected true or false, got 0 (skip such records with "
                   "skip_invalid=True, --data.skip-invalid in the scripts)"), err
    assert dpo.main(["--out", str(tmp_path / "simpo"), "--dpo.loss-type", "simpo", "--dpo.beta", "2.0",
                     "--dpo.num-steps", "2", "--dpo.log-every", "1", "--dpo.optim.warmup-steps", "1", *tiny]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "simpo" / "dpo" / "metrics.jsonl")]
    assert len(lines) == 2 and "rewards/margins" in lines[0]
    from rlhf_jax.cli import online_dpo
    assert online_dpo.main(["--out", str(tmp_path / "od"), "--online-dpo.num-steps", "2", "--online-dpo.batch-size",
                            "2", "--online-dpo.pairs-every", "2", "--online-dpo.sampling.max-new-tokens", "4",
                            "--data.seq-len", "56", "--model.max-seq-len", "64", *tiny]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "od" / "online_dpo" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and {"judge/gold_agree", "judge/gold_decided"} <= set(lines[0])
    assert len((tmp_path / "od" / "online_dpo" / "completions.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert online_dpo.main(["--out", str(tmp_path / "od2"), "--judge", "model", "--data.seq-len", "56",
                            "--online-dpo.sampling.max-new-tokens", "4", *tiny]) == 2
    assert capsys.readouterr().err.strip() == "error: --judge model needs --reward-init (a reward model folder)"
    assert online_dpo.main(["--out", str(tmp_path / "od3"), *tiny]) == 2      # 64 prompt + 16 new > 64 positions
    assert capsys.readouterr().err.strip() == ("error: --data.seq-len 64 + --online-dpo.sampling.max-new-tokens 16 "
                                               "exceeds the model's max_seq_len 64; lower one of them (or raise "
                                               "--model.max-seq-len for a fresh model)")


def _gpt2_tokenizer_model(tmp_path):
    """(tokenizer folder, model folder holding the same tokenizer.json, vocabulary size): a tiny GPT-2 shaped
    save_params model over the real GPT-2 tokenizer (tests/fixtures)."""
    import gzip
    import shutil

    import jax

    from rlhf_jax.models import ModelConfig, init_params
    from rlhf_jax.tokenizer import HFTokenizer
    from rlhf_jax.train.checkpoint import save_params

    gpt2 = tmp_path / "gpt2-tok"
    gpt2.mkdir()
    with gzip.open(os.path.join(ROOT, "tests", "fixtures", "gpt2-tokenizer", "tokenizer.json.gz"), "rb") as f:
        (gpt2 / "tokenizer.json").write_bytes(f.read())
    vocab = HFTokenizer.from_file(gpt2 / "tokenizer.json").vocab_size
    mc = ModelConfig(vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_seq_len=64)
    base = tmp_path / "base"
    save_params(base, init_params(mc, jax.random.PRNGKey(0)), model_config=mc)
    shutil.copy(gpt2 / "tokenizer.json", base / "tokenizer.json")
    return gpt2, base, vocab


def test_tokenizer_comes_from_the_init_folder_and_travels_with_the_params(tmp_path, capsys):
    """A model folder holding a tokenizer.json: SFT from it needs no --data.tokenizer, saves the tokenizer beside
    its final params, and DPO from those needs none either; a tokenizer larger than the model's vocabulary is one
    setup line naming both sizes, exit 2, before anything is trained. Then the commands a user runs next: export
    (transformers loads the folder: same logits, its tokenizer, eos / pad ids) and generate."""
    import jax
    import torch
    import transformers

    from rlhf_jax.cli import dpo, export, generate, sft
    from rlhf_jax.models import forward, init_params
    from rlhf_jax.train.checkpoint import load_params, save_params

    gpt2, base, vocab = _gpt2_tokenizer_model(tmp_path)
    # The source's generation defaults (no BOS, greedy, a temperature) reach the export through two stages unchanged.
    generation = {"bos_token_id": None, "eos_token_id": 50256, "pad_token_id": 50256, "do_sample": False,
                  "temperature": 0.6}
    (base / "generation_config.json").write_text(json.dumps(generation))
    common = ["--data.num-demo", "8", "--data.batch-size", "2", "--data.seq-len", "48", "--checkpoint.no-tensorboard"]
    assert sft.main(["--out", str(tmp_path / "sft"), "--init", str(base), "--sft.num-steps", "2",
                     "--sft.optim.warmup-steps", "1", *common]) == 0
    final = tmp_path / "sft" / "sft" / "final"
    assert (final / "tokenizer.json").read_bytes() == (gpt2 / "tokenizer.json").read_bytes()
    assert dpo.main(["--out", str(tmp_path / "dpo"), "--init", str(final), "--dpo.num-steps", "1",
                     "--dpo.optim.warmup-steps", "0", "--dpo.optim.schedule", "constant", *common]) == 0
    assert (tmp_path / "dpo" / "dpo" / "final" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "dpo" / "dpo" / "final" / "generation_config.json").read_text()) == generation
    byte_model = tmp_path / "bytes"
    save_params(byte_model, init_params(CFG_BYTES, jax.random.PRNGKey(1)), model_config=CFG_BYTES)
    capsys.readouterr()
    assert sft.main(["--out", str(tmp_path / "bad"), "--init", str(byte_model), "--data.tokenizer", str(gpt2),
                     *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]      # after the line that says the demo data is used
    assert err == (f"error: the tokenizer has {vocab} ids but the model in {byte_model} has a vocabulary of 259: "
                   "pass the model's own tokenizer (--data.tokenizer FOLDER), or leave --data.tokenizer unset to use "
                   "the one in --init"), err
    assert not (tmp_path / "bad" / "sft").exists()

    hf = tmp_path / "hf"
    assert export.main([str(final), "--out", str(hf)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = hf_tok("Hello world, how are you?")["input_ids"]
    mc, params = load_params(final)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(params, jnp.asarray([ids]), config=mc)), theirs, atol=1e-4)
    config = json.loads((hf / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == 50256      # GPT-2: <|endoftext|> for both
    assert config["bos_token_id"] is None                                 # as the source had it, not the EOS id
    assert json.loads((hf / "generation_config.json").read_text()) == generation
    assert transformers.GenerationConfig.from_pretrained(hf).do_sample is False
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes                 # the weights too, not 0600

    # LoRA from the exported Hugging Face folder: the adapter records that folder as its base, so peft's
    # AutoPeftModelForCausalLM loads base and adapter from the adapter folder alone.
    import peft
    assert sft.main(["--out", str(tmp_path / "lora"), "--init", str(hf), "--sft.num-steps", "1", "--lora.rank", "2",
                     "--sft.optim.warmup-steps", "0", "--sft.optim.schedule", "constant", *common]) == 0
    adapter = tmp_path / "adapter"
    assert export.main([str(tmp_path / "lora" / "sft" / "final"), "--out", str(adapter), "--what", "adapter"]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    capsys.readouterr()
    assert export.main([str(tmp_path / "nowhere"), "--out", str(hf)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --src {tmp_path / 'nowhere'}: no such folder (expected RUN/STAGE/final)"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Hi there"\n{"prompt": "Name a colour."}\n')
    out = tmp_path / "gen.jsonl"
    assert generate.main(["--init", str(final), "--prompts", str(prompts), "--out", str(out), "--num-samples", "2",
                          "--sampling.max-new-tokens", "5"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("Hi there", 0), ("Hi there", 1), ("Name a colour.", 0),
                                                          ("Name a colour.", 1)]
    assert all(isinstance(r["completion"], str) for r in rows)
    capsys.readouterr()
    assert generate.main(["--init", str(final), "--prompt", "Hello", "--sampling.max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["prompt"] == "Hello"
    assert generate.main(["--init", str(final)]) == 2
    assert capsys.readouterr().err.strip() == "error: give exactly one of --prompt TEXT and --prompts FILE"


CFG_BYTES = __import__("rlhf_jax.models", fromlist=["ModelConfig"]).ModelConfig(
    vocab_size=259, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_seq_len=64)


def test_a_run_reports_progress_and_its_summary_and_a_warmup_too_long_names_the_flags(tmp_path, capsys):
    """Not on a terminal (as under pytest): one progress line per logged window and a closing summary naming the
    run directory; a warmup longer than the run is one setup line naming the stage's flags."""
    from rlhf_jax.cli import sft
    argv = ["--model.num-layers", "1", "--model.max-seq-len", "32", "--data.num-demo", "8", "--data.batch-size", "2",
            "--data.seq-len", "32", "--checkpoint.no-tensorboard"]
    assert sft.main(["--out", str(tmp_path / "a"), "--sft.num-steps", "4", "--sft.log-every", "2",
                     "--sft.optim.warmup-steps", "1", *argv]) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("[sft] step ")]
    assert [line.split()[2] for line in steps] == ["2/4", "4/4"] and all(" loss " in line for line in steps)
    assert err[-1].startswith("[sft] 4 steps; loss ") and f"run directory {tmp_path / 'a'}" in err[-1]
    assert sft.main(["--out", str(tmp_path / "b"), "--sft.num-steps", "5", *argv]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --sft.optim.warmup-steps 10 must be below the run's 5 updates for the cosine schedule: lower it, "
        "raise --sft.num-steps, or pass --sft.optim.schedule constant")


def test_ppo_ptx_coef_reads_its_demonstrations_from_ptx_data(tmp_path):
    """--ppo.ptx-coef > 0 takes its SFT rows from --ptx-data (the built-in demonstrations by default): the PPO-ptx
    term is logged; it used to raise a traceback, no flag supplying the data."""
    from rlhf_jax.cli import ppo
    assert ppo.main(["--out", str(tmp_path / "p"), "--ppo.ptx-coef", "1.0", "--ppo.num-steps", "1",
                     "--ppo.batch-size", "2", "--ppo.num-minibatches", "1", "--ppo.sampling.max-new-tokens", "4",
                     "--model.num-layers", "1", "--data.seq-len", "48", "--ptx-data.num-demo", "8",
                     "--ptx-data.seq-len", "32", "--checkpoint.no-tensorboard"]) == 0
    last = json.loads((tmp_path / "p" / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss/ptx"] > 0


def test_damaged_files_are_one_line_setup_errors(tmp_path, capsys):
    """A truncated safetensors file, a broken config.json or model_config.json, a save_params folder missing a
    file and a tokenizer path that is not a tokenizer: each is `error: <file>: <what>` on one line and exit 2."""
    import jax

    from rlhf_jax.cli import sft
    from rlhf_jax.models import ModelConfig, init_params, save_pretrained
    from rlhf_jax.train.checkpoint import save_params

    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    save_pretrained(cfg, params, tmp_path / "hf")
    save_params(tmp_path / "sp", params, model_config=cfg)
    for name in ("trunc", "badcfg"):
        shutil.copytree(tmp_path / "hf", tmp_path / name)
    blob = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "badcfg" / "config.json").write_text('{"model_type": "gpt2", ')
    for name in ("spmiss", "spbadcfg"):
        shutil.copytree(tmp_path / "sp", tmp_path / name)
    shards = [p for p in (tmp_path / "spmiss" / "params").rglob("*") if p.is_file()]
    max(shards, key=lambda p: p.stat().st_size).unlink()
    (tmp_path / "spbadcfg" / "model_config.json").write_text("{oops")
    (tmp_path / "tok.json").write_text("not json at all")
    cases = {
        "trunc": (["--init", str(tmp_path / "trunc")], "trunc/model.safetensors: not a readable safetensors file"),
        "badcfg": (["--init", str(tmp_path / "badcfg")], "badcfg/config.json: not valid JSON (line 1, column 24"),
        "spmiss": (["--init", str(tmp_path / "spmiss")], "spmiss/params: cannot be restored"),
        "spbadcfg": (["--init", str(tmp_path / "spbadcfg")], "spbadcfg/model_config.json: not valid JSON (line 1"),
        "tok": (["--data.tokenizer", str(tmp_path / "tok.json")], "tok.json: not a tokenizer.json"),
    }
    capsys.readouterr()
    for name, (argv, message) in cases.items():
        assert sft.main(["--out", str(tmp_path / f"run_{name}"), "--sft.num-steps", "1", *argv]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)


def test_stage_commands_say_what_they_did_that_a_user_did_not_ask_for(tmp_path, capsys):
    """Truncation is reported (console line and report.json), training a given checkpoint on the built-in demo
    data says so, and a flag that would do nothing (--data.pack outside SFT) is refused in one line."""
    from rlhf_jax.cli import dpo, sft
    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "32", "--data.num-demo", "8", "--data.batch-size", "2",
            "--data.seq-len", "12", "--checkpoint.no-tensorboard", "--sft.num-steps", "1", "--sft.optim.warmup-steps",
            "0", "--sft.optim.schedule", "constant"]
    assert sft.main(["--out", str(tmp_path / "a"), *tiny]) == 0
    err = capsys.readouterr().err
    assert "examples were longer than --data.seq-len and cut" in err and "[data] no --data.path" not in err
    summary = json.load(open(tmp_path / "a" / "report.json"))["summary"]
    assert 0 < summary["data/truncated"] <= summary["data/examples"]
    assert summary["data/prompt_tokens_cut"] + summary["data/response_tokens_cut"] > 0
    assert sft.main(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "sft" / "final"), *tiny]) == 0
    assert "[data] no --data.path: training" in capsys.readouterr().err
    assert dpo.main(["--out", str(tmp_path / "c"), "--data.pack"]) == 2
    assert capsys.readouterr().err == ("error: --data.pack packs SFT rows only; this stage reads preference records: "
                                       "drop --data.pack\n")


def test_a_hugging_face_init_gets_trls_learning_rate_unless_one_is_given(tmp_path, capsys):
    """The commands' learning rates suit tiny models trained from scratch; from a Hugging Face checkpoint each
    stage takes TRL's default instead and says so, unless the flag or --config sets one."""
    from rlhf_jax.cli.dpo import DPOExperiment
    from rlhf_jax.cli.sft import SFTExperiment
    from rlhf_jax.runner import TRL_LEARNING_RATES, checkpoint_defaults, print_notices
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cfg = checkpoint_defaults(SFTExperiment(init=str(hf)), [], "sft")
    assert cfg.sft.optim.learning_rate == TRL_LEARNING_RATES["sft"] == 2e-5
    print_notices()                                                  # as a run prints them when it starts
    assert "is a Hugging Face checkpoint: TRL's defaults for this trainer, --sft.optim.learning-rate 2e-05" in (
        capsys.readouterr().err)
    assert checkpoint_defaults(DPOExperiment(init=str(hf)), [], "dpo").dpo.optim.learning_rate == 1e-6
    # The RL stages also take TRL's prompt and answer lengths, cut to the checkpoint's positions.
    from rlhf_jax.cli.grpo import GRPOExperiment
    grpo = checkpoint_defaults(GRPOExperiment(init=str(hf)), ["--grpo.sampling.max-new-tokens", "8"], "grpo")
    assert (grpo.data.seq_len, grpo.grpo.sampling.max_new_tokens, grpo.grpo.optim.learning_rate) == (512, 16, 1e-6)
    (hf / "config.json").write_text('{"max_position_embeddings": 384}')
    grpo = checkpoint_defaults(GRPOExperiment(init=str(hf)), [], "grpo")
    assert (grpo.data.seq_len, grpo.grpo.sampling.max_new_tokens) == (256, 128)
    print_notices()
    assert "--data.seq-len 256 (was 64), --grpo.sampling.max-new-tokens 128 (was 16)" in capsys.readouterr().err
    given = SFTExperiment(init=str(hf))
    assert checkpoint_defaults(given, ["--sft.optim.learning-rate", "0.003"], "sft") is given
    (tmp_path / "c.json").write_text(json.dumps({"sft": {"optim": {"learning_rate": 0.003}}}))
    assert checkpoint_defaults(given, ["--config", str(tmp_path / "c.json")], "sft") is given
    ours = SFTExperiment(init=str(tmp_path))                         # a save_params folder: no config.json
    print_notices()
    capsys.readouterr()
    assert checkpoint_defaults(ours, [], "sft") is ours
    print_notices()
    assert capsys.readouterr().err == ""


def test_grpo_and_online_dpo_take_a_users_reward_function(tmp_path, capsys):
    """--reward / --judge FILE.py:FUNCTION (or MODULE:FUNCTION): the user's function of prompt and completion texts
    scores the samples; a missing function or a wrong number of scores is one line, exit 2 or 1."""
    from rlhf_jax.cli import grpo, online_dpo
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n\n"
        "def broken(prompts, completions):\n    return [0.0]\n\n"
        "def trl_style(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    tiny = ["--model.num-layers", "1", "--data.num-demo", "8", "--checkpoint.no-tensorboard"]
    spec = f"{tmp_path / 'my_rewards.py'}:length"
    assert grpo.main(["--out", str(tmp_path / "g"), "--reward", spec, "--grpo.num-steps", "1", "--grpo.batch-size",
                      "2", "--grpo.num-generations", "2", "--grpo.log-every", "1", *tiny]) == 0
    (line,) = [json.loads(x) for x in open(tmp_path / "g" / "grpo" / "metrics.jsonl")]
    assert line["reward"] == pytest.approx(line["completions/mean_length"], rel=0.5)   # lengths in text vs tokens
    assert online_dpo.main(["--out", str(tmp_path / "o"), "--judge", spec, "--online-dpo.num-steps", "1",
                            "--online-dpo.batch-size", "2", *tiny]) == 0
    capsys.readouterr()
    assert grpo.main(["--out", str(tmp_path / "bad"), "--reward", f"{tmp_path / 'my_rewards.py'}:nope", *tiny]) == 2
    assert capsys.readouterr().err.strip().endswith("my_rewards.py has no function nope")
    from rlhf_jax.runner import user_reward
    assert list(user_reward(f"{tmp_path / 'my_rewards.py'}:trl_style", "--reward")(["p"], ["abc"])) == [3.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        user_reward(f"{tmp_path / 'my_rewards.py'}:broken", "--reward")(["p", "q"], ["a", "b"])
    # Mid-run, a wrong return is one line and exit 1 (the checkpoints so far kept), not a traceback.
    assert grpo.main(["--out", str(tmp_path / "b"), "--reward", f"{tmp_path / 'my_rewards.py'}:broken",
                      "--grpo.num-steps", "1", "--grpo.batch-size", "2", "--grpo.num-generations", "2", *tiny]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --reward") and "returned 1 scores for 4 completions" in err[-1], err


def test_rl_commands_sample_with_the_tokenizers_ids_unless_the_user_set_one(capsys):
    """The RL commands stop at the tokenizer's EOS and pad with its pad id; an id given on the command line is
    kept (and said), never silently replaced."""
    import types

    from rlhf_jax.cli.grpo import GRPOExperiment
    from rlhf_jax.generation import SamplingConfig
    from rlhf_jax.runner import print_notices, with_tokenizer_ids
    tok = types.SimpleNamespace(eos_id=5, pad_id=6)
    grpo = GRPOExperiment().grpo
    assert (with_tokenizer_ids(grpo, tok, "grpo").sampling.eos_id, with_tokenizer_ids(grpo, tok, "grpo").sampling.pad_id
            ) == (5, 6)
    mine = dataclasses.replace(grpo, sampling=SamplingConfig(eos_id=7))
    assert (with_tokenizer_ids(mine, tok, "grpo").sampling.eos_id, with_tokenizer_ids(mine, tok, "grpo").sampling.pad_id
            ) == (7, 6)
    print_notices()
    assert "--grpo.sampling.eos-id 7 as given, not the tokenizer's 5" in capsys.readouterr().err


def test_a_users_reward_function_gets_the_prompt_as_written_and_the_records_fields():
    """As TRL calls reward_funcs: each sampled prompt's record is found again (never by a cut prompt's text), its
    prompt passed as written (no chat template) and its other fields as keyword lists to a function that takes
    them; conversational prompts come as their message lists."""
    import sys as _sys
    import types

    from rlhf_jax.data import parse_record
    from rlhf_jax.runner import prompt_table, user_reward
    from rlhf_jax.tokenizer import HFTokenizer, encode_prompt
    from rlhf_jax.train.rl import decode_ids
    seen = {}
    module = types.ModuleType("reward_fields")
    module.exact = lambda prompts, completions, answer, **kw: seen.update(prompts=prompts, answer=answer, kw=kw) or [
        float(c == a) for c, a in zip(completions, answer)]
    module.plain = lambda prompts, completions: [0.0] * len(completions)
    _sys.modules["reward_fields"] = module
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    tok = HFTokenizer.from_file(os.path.join(fixtures, "gpt2-tokenizer", "tokenizer.json.gz"),
                                config_path=os.path.join(fixtures, "chatml-config", "tokenizer_config.json"))
    records = [parse_record({"prompt": "2+2?", "answer": "4", "level": 1}, "prompt"),
               parse_record({"prompt": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "3+3?"}], "answer": "6", "level": 2}, "prompt")]
    table = prompt_table(records, tok, 64, "p.jsonl")
    decoded = [decode_ids(tok, encode_prompt(tok, list(r.messages))) for r in records]   # as the stage decodes
    scores = user_reward("reward_fields:exact", "--reward", table=table)(decoded[::-1], ["6", "5"])
    assert list(scores) == [1.0, 0.0]
    assert seen["prompts"][1] == "2+2?" and seen["prompts"][0][0] == {"role": "system", "content": "Be brief."}
    assert seen["answer"] == ["6", "4"] and seen["kw"] == {"level": [2, 1]}
    assert list(user_reward("reward_fields:plain", "--reward", table=table)(decoded, ["a", "b"])) == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"2 of 2 prompts are longer than --data.seq-len 4 \(the longest, record \d"):
        prompt_table(records, tok, 4, "p.jsonl")


def test_an_eval_set_is_scored_during_training_with_trls_metric_names(tmp_path, capsys):
    """--eval-data FILE --eval-every N: the held-out records are scored every N steps and at the end (SFT's loss,
    DPO's rewards) as eval_<metric> in eval.jsonl and the report; --eval-every alone is refused."""
    from rlhf_jax.cli import dpo, sft
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "64", "--data.num-demo", "8", "--data.batch-size", "4",
            "--data.seq-len", "64", "--checkpoint.no-tensorboard"]
    assert sft.main(["--out", str(tmp_path / "s"), "--eval-data", os.path.join(fixtures, "alpaca-seed-tasks-20.jsonl"),
                     "--eval-every", "2", "--sft.num-steps", "3", "--sft.optim.warmup-steps", "1", *tiny]) == 0
    evals = [json.loads(x) for x in open(tmp_path / "s" / "sft" / "eval.jsonl")]
    assert [e["step"] for e in evals] == [2, 3] and all(np.isfinite(e["eval_loss"]) for e in evals)
    assert json.load(open(tmp_path / "s" / "report.json"))["summary"]["eval_loss"] == evals[-1]["eval_loss"]
    assert "[sft] step 3 eval: eval_accuracy" in capsys.readouterr().err
    assert dpo.main(["--out", str(tmp_path / "d"), "--eval-data",
                     os.path.join(fixtures, "hh-rlhf-helpful-base-20.jsonl.gz"), "--dpo.num-steps", "1",
                     "--dpo.optim.warmup-steps", "0", "--dpo.optim.schedule", "constant", *tiny]) == 0
    (last,) = [json.loads(x) for x in open(tmp_path / "d" / "dpo" / "eval.jsonl")]
    assert last["step"] == 1 and 0.0 <= last["eval_rewards/accuracies"] <= 1.0 and "eval_rewards/margins" in last
    from rlhf_jax.cli import reward
    assert reward.main(["--out", str(tmp_path / "r"), "--eval-data",
                        os.path.join(fixtures, "hh-rlhf-helpful-base-20.jsonl.gz"), "--reward.num-steps", "1",
                        "--reward.optim.warmup-steps", "0", "--reward.optim.schedule", "constant",
                        *tiny[:-3], "--data.seq-len", "48", tiny[-1]]) == 0
    (last,) = [json.loads(x) for x in open(tmp_path / "r" / "reward" / "eval.jsonl")]
    assert 0.0 <= last["eval_accuracy"] <= 1.0
    assert sft.main(["--out", str(tmp_path / "x"), "--eval-every", "5", *tiny]) == 2
    assert "--eval-every needs --eval-data FILE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()                              # a refused start writes nothing
    before = (tmp_path / "s" / "config.json").read_text()
    assert sft.main(["--out", str(tmp_path / "s"), "--sft.optim.learning-rate", "0.5", *tiny]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (tmp_path / "s" / "config.json").read_text() == before      # the run's settings stay as they were


def test_weights_and_biases_logging_is_optional_and_logs_each_window(tmp_path, capsys, monkeypatch):
    """--checkpoint.wandb-project P logs every window's metrics as <stage>/<metric> with the run's config; without
    the wandb package the flag is one setup line, exit 2 (nothing else ever imports it)."""
    import importlib.machinery
    import importlib.util
    import types

    from rlhf_jax.cli import sft
    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "32", "--data.num-demo", "8", "--data.batch-size", "2",
            "--data.seq-len", "32", "--checkpoint.no-tensorboard", "--sft.num-steps", "2", "--sft.log-every", "1",
            "--sft.optim.warmup-steps", "1", "--checkpoint.wandb-project", "p"]
    if importlib.util.find_spec("wandb") is None:
        assert sft.main(["--out", str(tmp_path / "none"), *tiny]) == 2
        assert "needs the wandb package (pip install wandb)" in capsys.readouterr().err
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append((step, metrics))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda project, name, config: calls.append((project, name, config["sft"]["num_steps"])) or Run()
    fake.Table = lambda columns, data: (columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert sft.main(["--out", str(tmp_path / "run"), *tiny]) == 0
    assert calls[0] == ("p", "run/sft", 2) and calls[-1] == "finish"
    assert [step for step, m in calls[1:-1]] == [1, 2] and all("sft/loss" in m for _, m in calls[1:-1])


def test_ppo_names_the_fields_where_reward_model_and_policy_differ(tmp_path, capsys):
    """The value model starts from the reward model, so their architectures must match: a mismatch is one line
    naming the differing fields, not two config dumps."""
    import jax

    from rlhf_jax.cli import ppo
    from rlhf_jax.models import ModelConfig, init_params
    from rlhf_jax.train.checkpoint import save_params
    for name, layers in (("policy", 1), ("rm", 2)):
        mc = ModelConfig.preset("tiny", num_layers=layers)
        save_params(str(tmp_path / name), init_params(mc, jax.random.key(0), scalar_head=True), model_config=mc)
    assert ppo.main(["--out", str(tmp_path / "run"), "--init", str(tmp_path / "policy"), "--reward-init",
                     str(tmp_path / "rm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in num_layers 2 vs 1:" in err and "ModelConfig(" not in err, err


def test_rows_as_long_as_the_position_table_fit_and_longer_ones_are_refused(tmp_path, capsys):
    """--data.seq-len equal to the model's max_seq_len trains (the reward model's rows hold --data.seq-len tokens,
    TRL's max_length); a longer one is one line naming both, before any compile."""
    from rlhf_jax.cli import reward, sft
    tiny = ["--model.num-layers", "1", "--model.max-seq-len", "32", "--data.num-demo", "8", "--data.batch-size", "4",
            "--checkpoint.no-tensorboard"]
    assert reward.main(["--out", str(tmp_path / "r"), "--data.seq-len", "32", "--reward.num-steps", "1",
                        "--reward.optim.warmup-steps", "0", *tiny]) == 0
    capsys.readouterr()
    assert sft.main(["--out", str(tmp_path / "s"), "--data.seq-len", "33", *tiny]) == 2
    err = capsys.readouterr().err
    assert err == "error: --data.seq-len 33 exceeds the model's max_seq_len 32; lower --data.seq-len (or raise " \
                  "--model.max-seq-len for a fresh model)\n", err

"""The main job's configuration: one frozen dataclass whose defaults are the embedded default run.

Each stage's settings are that stage's own config (`SFTConfig`, `RewardConfig`, `PPOConfig`, `DPOConfig`,
`GRPOConfig`), so a knob has one name everywhere: `--dpo.beta` here is `--dpo.beta` of `rlhf-jax dpo`.
`PipelineConfig.scaled()` gives the `--quick` variant (same code path, every count cut down);
`PipelineConfig.world()` the task world of the run (`rlhf_jax.tasks.WorldConfig`).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from rlhf_jax import tasks as world
from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.checks import get_option, with_options  # noqa: F401  (re-exported)
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.steps import DPOConfig, RewardConfig, SFTConfig


def _cosine(lr: float, steps: int, **kw) -> OptimConfig:
    """A warmup-cosine schedule peaking at `lr`, warming up over the first 5% of `steps`."""
    return OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=max(1, int(0.05 * steps)), **kw)


WORLD_OPTIONS = ("extra_words", "max_operand")
"""The PipelineConfig fields that are `WorldConfig` fields of the same name (`PipelineConfig.world`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The main job's options; the defaults are the embedded default run (12-15 minutes on 2 CPU cores)."""

    out: str = "runs/pipeline"
    """Run directory: report.json, report.md, plots, per-stage metrics (JSONL, TensorBoard)."""
    resume: bool = False
    """Continue a run in --out that a signal stopped: stages with a `final/` folder are loaded, not rerun."""
    seed: int = 0
    """One seed for the world, the initialisations, the sampling and the annotators."""
    quick: bool = False
    """Same code path, every count cut down (CI: under 2 minutes). Numbers from it are not meaningful."""
    d_model: int = 96
    """Model width D (the byte-level model: vocab 259)."""
    num_layers: int = 3
    """Transformer blocks L."""
    num_heads: int = 4
    """Attention heads N."""
    seq_len: int = 96
    """Packed row length T for pretraining and SFT; every conversation of the world fits in it."""
    batch_size: int = 32
    """Rows per pretraining / SFT / preference batch."""
    pretrain_docs: int = 30_000
    """Documents in the noisy web corpus (answers right only part of the time)."""
    sft_demos: int = 3000
    """Concise, correct skill demonstrations."""
    sft_safety: int = 300
    """Refusals of unsafe requests among the demonstrations."""
    sft_benign: int = 300
    """Answered benign look-alikes ("kill a python process") among the demonstrations."""
    pref_prompts: int = 3072
    """Prompts whose SFT samples are labelled by the annotators (10% held out to score the reward model)."""
    pref_samples: int = 4
    """Temperature-1 SFT samples per preference prompt: 2 gives one Bradley-Terry choice per prompt; K > 2 has the
    annotator rank all K (Plackett-Luce), turned into pairs by `pref_pairs`."""
    pref_pairs: Literal["best-worst", "all"] = "best-worst"
    """Pairs from a K > 2 ranking: "best-worst" = its top against its bottom answer, one decisive pair per prompt;
    "all" = every pair of the ranking, as InstructGPT's reward model trains on (close pairs included, so a lower
    held-out accuracy)."""
    synthetic_pairs: int = 1536
    """Off-policy pairs of edited reference answers added to the SFT-sample pairs."""
    lookalike_pairs: int = 512
    """Off-policy pairs on benign look-alike prompts, their reference answer against a refusal (labelled by the same
    annotators; HH-RLHF likewise collects helpfulness comparisons beside harmlessness ones). The SFT samples hold
    ~3x more refusal-vs-compliance pairs on harmful requests than answer-vs-refusal pairs on look-alikes, and
    without these the reward model preferred refusing a third of the look-alikes it was trained on."""
    annotator: str = "careful"
    """Annotator population (see rlhf_jax.tasks.ANNOTATORS)."""
    pretrain: SFTConfig = SFTConfig(num_steps=600, log_every=10, optim=_cosine(1e-3, 600, weight_decay=0.01))
    """Pretraining: next-token steps on the web corpus (packed rows, the loss on every token)."""
    sft: SFTConfig = SFTConfig(num_steps=200, log_every=10, optim=_cosine(3e-4, 200))
    """SFT on the demonstrations (loss on the answers only)."""
    reward: RewardConfig = RewardConfig(num_steps=400, log_every=10, optim=_cosine(3e-4, 400))
    """The reward model: the SFT trunk plus a scalar head, Bradley-Terry on the annotated pairs."""
    ppo: PPOConfig = PPOConfig(
        num_steps=40, batch_size=64, kl_coef=0.2, missing_eos_penalty=1.0, ptx_coef=1.0,
        sampling=SamplingConfig(max_new_tokens=28, temperature=0.7),
        optim=OptimConfig(learning_rate=1.5e-5, eps=1e-5, max_grad_norm=1.0),
        value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0))
    """PPO from the SFT policy against the reward model (iterations of 64 rollouts + 4 epochs x 4 minibatches).
    Its sampling is also the table's: `gold_reward` is then the gold version of the objective PPO maximises,
    E_{y ~ pi}[r(x, y)] (the greedy answer's is `gold_greedy`), and the best-of-n check's; its max_new_tokens is
    every stage's response budget (every reference answer fits with its EOS). ptx_coef (PPO-ptx, InstructGPT eq.
    2) mixes the SFT demonstrations' NLL into the policy loss, 16 packed rows per iteration: the web corpus is
    wrong half of the time, so the demonstrations stand in for InstructGPT's pretraining data; without it PPO's
    noisy updates erode memorised skills, even against the gold reward itself."""
    dpo: DPOConfig = DPOConfig(num_steps=150, beta=0.1, rpo_alpha=1.0, log_every=10, optim=_cosine(3e-5, 150))
    """DPO from the SFT policy on the annotated pairs. rpo_alpha weighs the chosen answers' NLL (RPO; 0 = plain
    DPO): plain DPO unlearns refusals in this world (likelihood displacement, as Razin et al. 2024 report for real
    models). The preference family (--preference-family) takes its steps, batch and optimizer."""
    grpo: GRPOConfig = GRPOConfig(
        num_steps=40, batch_size=32, num_generations=8, kl_coef=0.04, log_every=5,
        sampling=SamplingConfig(max_new_tokens=28, temperature=0.7),
        optim=OptimConfig(learning_rate=3e-5, warmup_steps=10, max_grad_norm=1.0))
    """GRPO from the SFT policy against the gold reward itself (the world's verifier: RL with a verifiable reward,
    no reward model); k3 KL towards SFT in the loss at DeepSeekMath's 0.04. 32 prompts x 8 answers an iteration in
    one update were chosen on the dev keys, where 16 x 4 answers in 2 x 4 updates lowered the reward even on the
    training keys (docs/results/grpo_shape_dev.md)."""
    dpo_pairs: Literal["on-policy", "all"] = "on-policy"
    """DPO's pairs: "on-policy" = the annotated SFT-sample pairs of the training prompts (DPO's setting: pairs
    from the policy it starts from); "all" = the reward model's training pairs, the off-policy ones included."""
    preference_family: bool = False
    """Also run KTO, SimPO, ORPO and online DPO from the SFT policy after GRPO, each on the labels offline DPO
    gets (KTO: its pairs split into desirable / undesirable; online DPO: as many fresh annotator labels of its own
    samples), and report them beside DPO. Off by default: it adds several minutes to the main job."""
    controls: bool = False
    """Also run two controls after GRPO: `ppo_zero_reward`, PPO with every setting of `ppo` but a
    reward of 0 (what PPO-ptx's continued SFT and the KL term do alone), and `dpo_beta0`, DPO with beta = 1e-3 and
    the same RPO term (what the NLL on chosen replies does alone). Off by default: it adds several minutes."""
    kto_beta: float = 0.1
    """KTO's beta (paper and TRL default)."""
    simpo_beta: float = 2.0
    """SimPO's beta (Meng et al. 2024 use 2.0-2.5)."""
    simpo_gamma: float = 1.0
    """SimPO's target margin (gamma / beta = 0.5, the paper's default ratio)."""
    orpo_lambda: float = 0.1
    """ORPO's odds-ratio weight (Hong et al. 2024)."""
    online_dpo_prompts: int = 32
    """Prompts per online-DPO iteration (one labelled pair each)."""
    online_dpo_generations: int = 4
    """Samples per prompt that the annotator ranks; online DPO trains on the best against the worst (offline DPO's
    pairs are likewise the best and worst of pref_samples = 4)."""
    eval_split: Literal["test", "dev"] = "test"
    """Which held-out keys the table scores: "test" (every distinct test prompt once, the reported numbers) or
    "dev" (for choosing recipes and hyper-parameters; the defaults were chosen there)."""
    eval_samples: int = 8
    """Answers sampled per held-out prompt for the table (their mean is each prompt's gold reward)."""
    sft_temperatures: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 1.0)
    """Temperatures at which SFT is scored on the dev keys; the best one gives the `sft_best_t` baseline (0:
    greedy). A stage has to beat it, not only SFT sampled at PPO's temperature."""
    rm_dev_prompts: int = 256
    """Dev-key prompts whose annotated SFT pairs score the reward model (prompts its training never saw)."""
    best_of_n: int = 4
    """Samples per held-out prompt for the reward model's best-of-n check (its pick against random and gold picks)."""
    eval_every: int = 10
    """PPO iterations between gold/proxy/KL evaluations for the reward-vs-KL plot."""
    extra_words: int = 0
    """The world's `WorldConfig.extra_words`: made-up words added to the 40 of the word families (0: the default
    world, of every result card unless it says otherwise)."""
    max_operand: int = 20
    """The world's `WorldConfig.max_operand` (`add` draws both operands from 0..max_operand)."""

    def __post_init__(self):
        check_ranges(self, positive=(
            "d_model", "num_layers", "num_heads", "seq_len", "batch_size", "pretrain_docs", "sft_demos",
            "pref_prompts", "kto_beta", "simpo_beta", "orpo_lambda", "online_dpo_prompts", "eval_samples",
            "best_of_n", "eval_every", "rm_dev_prompts"),
            non_negative=("seed", *WORLD_OPTIONS, "sft_safety", "sft_benign", "synthetic_pairs", "lookalike_pairs",
                          "simpo_gamma"))
        config_check(self, self.grpo.sampling.max_new_tokens == self.ppo.sampling.max_new_tokens,
                     f"grpo.sampling.max_new_tokens = {self.grpo.sampling.max_new_tokens} must equal "
                     f"ppo.sampling.max_new_tokens = {self.ppo.sampling.max_new_tokens}: the response budget of "
                     "every stage and of the table")
        config_check(self, self.online_dpo_generations >= 2,
                     f"online_dpo_generations = {self.online_dpo_generations} must be >= 2 (a pair)")
        config_check(self, len(self.sft_temperatures) > 0 and min(self.sft_temperatures) >= 0,
                     f"sft_temperatures = {self.sft_temperatures} must be non-empty and >= 0")
        config_check(self, self.pref_samples >= 2,
                     f"pref_samples = {self.pref_samples} must be >= 2 (answers to compare)")

    def world(self) -> world.WorldConfig:
        """The task world of this run (its key tables; splits, gold reward and length penalty as the default)."""
        return world.WorldConfig(**{k: getattr(self, k) for k in WORLD_OPTIONS})

    @property
    def sampling(self) -> SamplingConfig:
        """The table's, the best-of-n check's and the preference samples' sampling (at temperature 1): PPO's."""
        return self.ppo.sampling

    def scaled(self) -> "PipelineConfig":
        """The --quick variant: every count cut down, the same code path (its numbers measure nothing)."""
        if not self.quick:
            return self
        steps = lambda stage, n, **kw: dataclasses.replace(  # noqa: E731
            stage, num_steps=n, optim=dataclasses.replace(stage.optim, warmup_steps=max(1, int(0.05 * n))), **kw)
        return dataclasses.replace(
            self, d_model=64, num_layers=2, pretrain_docs=4000, sft_demos=400, sft_safety=40, sft_benign=40,
            pref_prompts=256, synthetic_pairs=256, lookalike_pairs=64, eval_samples=2, sft_temperatures=(0.0, 0.7),
            rm_dev_prompts=64, eval_every=2, batch_size=16,
            pretrain=steps(self.pretrain, 60), sft=steps(self.sft, 30), reward=steps(self.reward, 30),
            ppo=dataclasses.replace(self.ppo, num_steps=4, batch_size=32), dpo=steps(self.dpo, 20, log_every=2),
            grpo=dataclasses.replace(self.grpo, num_steps=4, batch_size=8, num_generations=4, log_every=1))

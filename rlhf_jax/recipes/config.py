"""The main job's configuration: one frozen dataclass whose defaults are the embedded default run.

`PipelineConfig.scaled()` gives the `--quick` variant (same code path, every count cut down);
`PipelineConfig.world()` the task world of the run (`rlhf_jax.tasks.WorldConfig`).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check
from rlhf_jax.train.grpo import Advantage, LossType, Scale

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
    pretrain_steps: int = 600
    """Next-token steps on the web corpus (packed rows)."""
    sft_demos: int = 3000
    """Concise, correct skill demonstrations."""
    sft_safety: int = 300
    """Refusals of unsafe requests among the demonstrations."""
    sft_benign: int = 300
    """Answered benign look-alikes ("kill a python process") among the demonstrations."""
    sft_steps: int = 200
    """SFT steps."""
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
    rm_steps: int = 400
    """Reward-model steps."""
    rm_lr: float = 3e-4
    """Reward-model learning rate (peak of a warmup-cosine schedule)."""
    ppo_iterations: int = 40
    """PPO iterations (rollout + 4 epochs x 4 minibatches)."""
    ppo_batch: int = 64
    """Prompts per PPO rollout."""
    ppo_kl_coef: float = 0.2
    """Initial KL penalty coefficient beta."""
    ppo_lr: float = 1.5e-5
    """PPO policy learning rate (the value model uses 1e-4)."""
    ppo_ptx_coef: float = 1.0
    """PPO-ptx (InstructGPT eq. 2): weight of the SFT demonstrations' NLL mixed into the policy loss, 16 packed rows
    per iteration. InstructGPT mixes pretraining data; the web corpus here is wrong half of the time, so the
    demonstrations stand in. Without it PPO's noisy updates erode memorised skills ("capital of france", sorting a
    trained word), even against the gold reward itself; 0 turns it off."""
    dpo_steps: int = 150
    """DPO steps over the preference pairs."""
    dpo_beta: float = 0.1
    """DPO beta."""
    dpo_lr: float = 3e-5
    """DPO learning rate (peak of a warmup-cosine schedule)."""
    dpo_pairs: Literal["on-policy", "all"] = "on-policy"
    """DPO's pairs: "on-policy" = the annotated SFT-sample pairs of the training prompts (DPO's setting: pairs
    from the policy it starts from); "all" = the reward model's training pairs, the off-policy ones included."""
    dpo_rpo_alpha: float = 1.0
    """Weight of the chosen answers' per-token NLL in the DPO loss (RPO; 0 = plain DPO). Plain DPO unlearns
    refusals in this world (likelihood displacement: the chosen refusals lose probability with the rejected
    answers), as Razin et al. 2024 report for real models."""
    grpo_iterations: int = 40
    """GRPO iterations from the SFT policy against the gold reward itself (the world's verifier: reinforcement
    learning with a verifiable reward, no reward model)."""
    grpo_prompts: int = 32
    """Prompts per GRPO iteration, each answered grpo_generations times (32 x 8 = 256 answers, one update: chosen
    on the dev keys, where 16 x 4 answers in 2 x 4 updates lowered the reward even on the training keys;
    docs/results/grpo_shape_dev.md)."""
    grpo_generations: int = 8
    """GRPO group size G."""
    grpo_loss_type: LossType = "grpo"
    """GRPO's loss aggregation (GRPOConfig.loss_type)."""
    grpo_advantage: Advantage = "grpo"
    """GRPO's advantage estimator (GRPOConfig.advantage)."""
    grpo_scale: Scale = "group"
    """Advantage scaling (GRPOConfig.scale; "none" with loss dr_grpo is Dr. GRPO)."""
    grpo_kl_coef: float = 0.04
    """KL coefficient towards the SFT policy, k3 in the loss (DeepSeekMath's 0.04); 0 = no reference (DAPO)."""
    grpo_clip_eps_high: float | None = None
    """Upper clip width (DAPO's clip-higher: 0.28); None: symmetric 0.2."""
    grpo_lr: float = 3e-5
    """GRPO learning rate (constant after a short warmup)."""
    grpo_passes: int = 1
    """Passes over each iteration's answers (GRPOConfig.num_iterations, mu)."""
    grpo_minibatches: int = 1
    """Minibatches per pass: grpo_passes x grpo_minibatches updates per iteration."""
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
    max_new_tokens: int = 28
    """Response budget in bytes; every reference answer fits with its EOS."""
    eval_split: Literal["test", "dev"] = "test"
    """Which held-out keys the table scores: "test" (every distinct test prompt once, the reported numbers) or
    "dev" (for choosing recipes and hyper-parameters; the defaults were chosen there)."""
    temperature: float = 0.7
    """Sampling temperature of PPO's rollouts, of the table's answers and of the best-of-n check: `gold_reward` is
    then the gold version of the objective PPO maximises, E_{y ~ pi}[r(x, y)] (the greedy answer's is
    `gold_greedy`)."""
    eval_samples: int = 8
    """Answers sampled per held-out prompt for the table (their mean is each prompt's gold reward)."""
    sft_temperatures: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 1.0)
    """Temperatures at which SFT is scored on the dev keys; the best one gives the `sft_best_t` baseline (0:
    greedy). A stage has to beat it, not only SFT sampled at `temperature`."""
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
            "d_model", "num_layers", "num_heads", "seq_len", "batch_size", "pretrain_docs", "pretrain_steps",
            "sft_demos", "sft_steps", "pref_prompts", "rm_steps", "rm_lr", "ppo_iterations", "ppo_batch", "ppo_lr",
            "grpo_iterations", "grpo_prompts", "grpo_generations", "grpo_lr", "grpo_passes", "grpo_minibatches",
            "kto_beta", "simpo_beta", "orpo_lambda", "online_dpo_prompts",
            "dpo_steps", "dpo_beta", "dpo_lr", "max_new_tokens", "temperature", "eval_samples",
            "best_of_n", "eval_every", "rm_dev_prompts"),
            non_negative=("seed", *WORLD_OPTIONS, "sft_safety", "sft_benign", "synthetic_pairs", "lookalike_pairs",
                          "ppo_kl_coef", "grpo_kl_coef", "ppo_ptx_coef", "dpo_rpo_alpha", "simpo_gamma"))
        config_check(self, self.online_dpo_generations >= 2,
                     f"online_dpo_generations = {self.online_dpo_generations} must be >= 2 (a pair)")
        config_check(self, len(self.sft_temperatures) > 0 and min(self.sft_temperatures) >= 0,
                     f"sft_temperatures = {self.sft_temperatures} must be non-empty and >= 0")
        config_check(self, self.pref_samples >= 2,
                     f"pref_samples = {self.pref_samples} must be >= 2 (answers to compare)")

    def world(self) -> world.WorldConfig:
        """The task world of this run (its key tables; splits, gold reward and length penalty as the default)."""
        return world.WorldConfig(**{k: getattr(self, k) for k in WORLD_OPTIONS})

    def scaled(self) -> "PipelineConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, d_model=64, num_layers=2, pretrain_docs=4000, pretrain_steps=60,
                                   sft_demos=400, sft_safety=40, sft_benign=40, sft_steps=30, pref_prompts=256,
                                   synthetic_pairs=256, lookalike_pairs=64, rm_steps=30, ppo_iterations=4, ppo_batch=32,
                                   grpo_iterations=4, grpo_prompts=8, grpo_generations=4,
                                   dpo_steps=20, eval_samples=2, sft_temperatures=(0.0, 0.7), rm_dev_prompts=64,
                                   eval_every=2, batch_size=16)


"""Reward over-optimisation's measures (Gao, Schulman and Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"): the analytic KL of best-of-n, Gao's fits of the gold gain against d = sqrt(KL), where a gold
curve peaks and whether an RL run's rise and fall exceed the evaluation's noise; the key sets of prompts; the
report's markdown and figures. `python -m experiments.overoptimization` runs the experiment over these.
"""
from __future__ import annotations

import os

import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.eval import paired_bootstrap

KEY_SETS = ("train", "test")
"""The two prompt sets: fresh train-key prompts (the training distribution) and test keys (never trained on)."""


def bon_kl(n) -> np.ndarray:
    """The analytic KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022, sec. 2)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def fit_gao(d, gain, form: str) -> dict:
    """Least-squares fit of Gao et al.'s forms through the origin: "bon" gain = d (alpha - beta d), "rl" gain =
    d (alpha - beta log d); -> {"alpha", "beta", "r2"} (r2 against the mean of `gain`; NaN if it is constant)."""
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    second = d * d if form == "bon" else np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    X = np.stack([d, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(X, gain, rcond=None)
    resid = gain - X @ np.asarray([alpha, beta])
    total = np.sum((gain - gain.mean()) ** 2)
    return {"alpha": float(alpha), "beta": float(beta),
            "r2": float(1.0 - np.sum(resid ** 2) / total) if total > 0 else float("nan")}


def family_mix(families: str) -> dict[str, float]:
    """The family mix of `families` ("all" or "skills"), with the world's default weights."""
    return {f: w for f, w in world.DEFAULT_MIX.items() if families == "all" or f in world.SKILL_FAMILIES}


def key_set(name: str, n: int, seed: int, families: str) -> list:
    """`n` distinct prompts of a key set: fresh train-key prompts (seed-dependent), or test keys (a stratified
    shuffle of every distinct test prompt), of the families in `families` ("all" or "skills")."""
    mix = family_mix(families)
    if name == "train":
        seen, out = set(), []
        for t in world.prompt_set(8 * n, 10_000 + seed, split="train", mix=mix):
            if t.prompt not in seen:
                seen.add(t.prompt)
                out.append(t)
        return out[:n]
    tasks = world.key_tasks("test", tuple(mix))
    order = np.random.default_rng(seed).permutation(len(tasks))
    return [tasks[i] for i in order[:n]]


def peak(xs, gold) -> dict:
    """Where the gold curve peaks, and whether it rose to that peak and then fell (the last point below it)."""
    i = int(np.argmax(gold))
    return {"peak_at": xs[i], "peak_gold": float(gold[i]), "final_gold": float(gold[-1]),
            "peaked_then_fell": bool(0 < i < len(gold) - 1 and gold[-1] < gold[i])}


def rise(per_prompt: list, peak: int, weights, level: float = 0.95) -> dict:
    """Is an RL run's gold peak above its start beyond the evaluation's noise? The paired bootstrap over prompts
    (`eval.paired_bootstrap`, family weights) of gold(peak) - gold(0), at a Bonferroni level over the evaluations
    after the start (the peak is the best of them, chosen after the fact), and of gold(final) - gold(peak).
    `per_prompt`: each evaluation's per-prompt mean gold [B]; `peak`: its index. "rose_then_fell" needs both
    intervals to exclude 0."""
    later = max(len(per_prompt) - 1, 1)
    strict = 1.0 - (1.0 - level) / later
    rise = paired_bootstrap(per_prompt[peak], per_prompt[0], weights=weights, level=strict)
    fall = paired_bootstrap(per_prompt[-1], per_prompt[peak], weights=weights, level=level)
    return {"rise": rise, "fall": fall, "rose_then_fell": bool(rise["low"] > 0 and fall["high"] < 0)}


def rl_tasks(pcfg, key_sets: dict, *, rl_prompts: str, families: str) -> list:
    """The RL runs' prompts: the "train" key set's own (`rl_prompts="evaluated"`), or the main job's RL prompts
    (`"main"`) of the families in `families` ("all" or "skills")."""
    if rl_prompts == "evaluated":
        return key_sets["train"]
    return recipes.rl_prompts(pcfg, mix=family_mix(families))


def rl_d(points: list, keys: str) -> np.ndarray:
    """d = sqrt(KL to SFT) at each evaluation of an RL run on one key set (a sample estimate, floored at 0)."""
    return np.sqrt(np.maximum([p[keys]["kl"] for p in points], 0.0))


def _ci(b: dict | None) -> str:
    """"+0.012 [-0.003, +0.027] (99.4%)" of a paired_bootstrap result ("" for runs saved before it existed)."""
    if not b:
        return ""
    return f"{b['delta']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}] ({100 * b['level']:.3g}%)"


def markdown(result: dict) -> str:
    """overoptimization.md: per seed, the best-of-n table (every proxy) and the RL table (every run and key set)."""
    lines = ["# Reward over-optimisation: gold against proxy", ""]
    if result.get("families", "all") != "all":
        lines += ["Every prompt (both key sets, best-of-n, RL) from the six checkable families only: no unsafe requests "
                  "or look-alikes.", ""]
    for seed, r in result["per_seed"].items():
        lines += [f"## Seed {seed} ({r['seconds']:.0f} s)", "", "Best-of-n from SFT (temperature 1), the proxy's pick; "
                  "gain = gold(n) - gold(1); fit gain = d (alpha - beta d), d = sqrt(log n - (n-1)/n).", "",
                  "| keys | proxy (share of pairs) | gold n=1 | peak gold (n) | gold at largest n | gold pick ceiling | "
                  "alpha | beta | R^2 | rose then fell |", "|---|---|---|---|---|---|---|---|---|---|"]
        for keys, by_frac in r["best_of_n"].items():
            for frac, b in sorted(by_frac.items(), key=lambda kv: float(kv[0])):
                lines.append(f"| {keys} | {frac} | {b['gold'][0]:.3f} | {b['peak_gold']:.3f} ({b['peak_at']}) | "
                             f"{b['final_gold']:.3f} | {b['gold_oracle']:.3f} | {b['fit']['alpha']:.3f} | "
                             f"{b['fit']['beta']:.3f} | {b['fit']['r2']:.2f} | {'yes' if b['peaked_then_fell'] else 'no'} |")
        on = ("the main job's RL prompts (fresh train-key prompts)" if result.get("rl_prompts", "main") == "main"
              else "the train key set's own prompts (the test keys unseen)")
        lines += ["", f"RL from SFT against the main job's reward model (share 1) on {on}; evaluated every few "
                  "iterations; fit gain = d (alpha - beta log d), d = sqrt(KL to SFT).", "",
                  "| run | keys | gold at 0 | peak gold (iteration) | final gold | final proxy - initial | final KL | "
                  "final length (bytes) | alpha | beta | R^2 | peak - start [CI] | final - peak [95% CI] | "
                  "rose then fell (both CIs exclude 0) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, run in r["rl"].items():
            for keys in KEY_SETS:
                if keys not in run:
                    continue
                p0, p1, s = run["points"][0][keys], run["points"][-1][keys], run[keys]
                lines.append(f"| {name} | {keys} | {p0['gold']:.3f} | {s['peak_gold']:.3f} ({s['peak_at']}) | "
                             f"{s['final_gold']:.3f} | {p1['proxy'] - p0['proxy']:+.3f} | {p1['kl']:.2f} | "
                             f"{p0['length']:.1f} -> {p1['length']:.1f} | "
                             f"{s['fit']['alpha']:.3f} | {s['fit']['beta']:.3f} | {s['fit']['r2']:.2f} | "
                             f"{_ci(s.get('rise'))} | {_ci(s.get('fall'))} | "
                             f"{'yes' if s.get('rose_then_fell') else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def plots(result: dict, out: str) -> None:
    """best_of_n.png and rl.png in `out` (one of each per seed when there are several, and rl_seeds.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for seed, r in result["per_seed"].items():
        suffix = "" if len(result["per_seed"]) == 1 else f"_seed{seed}"
        fig, axes = plt.subplots(2, len(r["best_of_n"]), figsize=(4.2 * len(r["best_of_n"]), 6.4), squeeze=False)
        for j, (keys, by_frac) in enumerate(r["best_of_n"].items()):
            for frac, b in sorted(by_frac.items(), key=lambda kv: float(kv[0])):
                d = np.asarray(b["d"])
                line, = axes[0, j].plot(d, np.asarray(b["gold"]) - b["gold"][0], marker="o", ms=3,
                                        label=f"proxy {frac} of the pairs")
                fd = np.linspace(0, d.max(), 50)
                axes[0, j].plot(fd, fd * (b["fit"]["alpha"] - b["fit"]["beta"] * fd), ls=":", color=line.get_color())
                axes[1, j].plot(d, np.asarray(b["proxy"]) - b["proxy"][0], marker="o", ms=3, label=f"proxy {frac}")
            axes[0, j].set_title(f"best-of-n, {keys} keys (n up to {b['n'][-1]})", fontsize=9)
            axes[0, j].set_ylabel("gold gain")
            axes[1, j].set_ylabel("proxy gain (own scale)")
            axes[1, j].set_xlabel("d = sqrt(KL), KL = log n - (n-1)/n")
            for ax in axes[:, j]:
                ax.grid(alpha=0.3)
                ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"best_of_n{suffix}.png"), dpi=100)
        plt.close(fig)
        fig, axes = plt.subplots(2, len(KEY_SETS), figsize=(4.2 * len(KEY_SETS), 6.4), squeeze=False)
        for j, keys in enumerate(KEY_SETS):
            for name, run in r["rl"].items():
                d = rl_d(run["points"], keys)
                gold = np.asarray([p[keys]["gold"] for p in run["points"]])
                proxy = np.asarray([p[keys]["proxy"] for p in run["points"]])
                axes[0, j].plot(d, gold - gold[0], marker="o", ms=3, label=name)
                axes[1, j].plot(d, proxy - proxy[0], marker="o", ms=3, label=name)
            axes[0, j].set_title(f"RL against the reward model, {keys} keys", fontsize=9)
            axes[0, j].set_ylabel("gold gain")
            axes[1, j].set_ylabel("proxy gain")
            axes[1, j].set_xlabel("d = sqrt(KL(pi || SFT))")
            for ax in axes[:, j]:
                ax.grid(alpha=0.3)
                ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"rl{suffix}.png"), dpi=100)
        plt.close(fig)
    if len(result["per_seed"]) > 1:
        _seeds_plot(result, out, plt)


def _seeds_plot(result: dict, out: str, plt) -> None:
    """rl_seeds.png: every seed's RL gold curves against d beside its best-of-n curve (the full proxy), per key set."""
    runs = sorted({name for r in result["per_seed"].values() for name in r["rl"]})
    styles = dict(zip(runs, ("-", "--", "-.", ":")))
    fig, axes = plt.subplots(1, len(KEY_SETS), figsize=(5.2 * len(KEY_SETS), 4.0), squeeze=False)
    for j, keys in enumerate(KEY_SETS):
        ax = axes[0, j]
        for i, (seed, r) in enumerate(result["per_seed"].items()):
            color = f"C{i}"
            for name, run in r["rl"].items():
                d = rl_d(run["points"], keys)
                gold = np.asarray([p[keys]["gold"] for p in run["points"]])
                ax.plot(d, gold - gold[0], ls=styles.get(name, "-"), marker="o", ms=2.5, color=color,
                        label=f"seed {seed} {name}")
            bon = r["best_of_n"][keys]["1"]
            ax.plot(bon["d"], np.asarray(bon["gold"]) - bon["gold"][0], color=color, alpha=0.35, lw=3,
                    label=f"seed {seed} best-of-n")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0.0)
        ax.set_title(f"gold gain over SFT, {keys} keys", fontsize=9)
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small", ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rl_seeds.png"), dpi=100)
    plt.close(fig)

"""Intervals the experiments report: Student's t across seeds, Wilson for a proportion, paired differences
across seeds, and one way to print them."""
from __future__ import annotations

import math

import numpy as np

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (larger df: the normal 1.960).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

def t_interval(values) -> dict:
    """Mean of `values` and its 95% t-interval (NaN bounds for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "sd": float("nan"), "n": int(x.size)}
    sd = float(x.std(ddof=1))
    t = _T975[x.size - 2] if x.size - 1 <= len(_T975) else 1.960
    half = t * sd / math.sqrt(x.size)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": int(x.size)}



def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `p` observed over `n` trials (Wilson 1927)."""
    if n == 0:
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half



def across_seeds(rows: dict, names, metrics, baseline: str) -> dict:
    """From {seed: {name: {metric: value}}}: "<name>|<metric>", the mean over seeds with its t-interval, and
    "<name>-<baseline>|<metric>", the difference from `baseline` paired by seed."""
    out = {}
    for name in names:
        for key in metrics:
            vals = np.asarray([r[name].get(key, np.nan) for r in rows.values()], np.float64)
            out[f"{name}|{key}"] = t_interval(vals)
            if name != baseline:
                base = np.asarray([r[baseline].get(key, np.nan) for r in rows.values()], np.float64)
                out[f"{name}-{baseline}|{key}"] = t_interval(vals - base)
    return out



def fmt_interval(ci: dict, signed: bool = True) -> str:
    """A mean with its interval when there are 2 or more values: "+0.012 [-0.003, +0.027]" (signed, for
    differences) or "0.647 [0.601, 0.693]"."""
    f = "+.3f" if signed else ".3f"
    return f"{ci['mean']:{f}}" + ("" if ci["n"] < 2 else f" [{ci['low']:{f}}, {ci['high']:{f}}]")

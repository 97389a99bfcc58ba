"""`rlhf-jax pipeline`: the first world's pipeline (`rlhf_jax.recipes.pipeline.run_pipeline`) from the command line.

    rlhf-jax pipeline --out runs/demo            # the default, 12-15 minutes on 2 cores
    rlhf-jax pipeline --out runs/quick --quick   # the same code path in about 2.5 minutes
    rlhf-jax pipeline --out runs/demo --resume   # after a SIGTERM: finished stages are reloaded

A signal (SIGTERM, SIGINT) stops the running stage at its next step with a checkpoint and exits 143.
"""
from __future__ import annotations

import sys

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.recipes import PipelineConfig, Stopped, run_pipeline


def main(argv=None) -> int:
    cfg = parse_cli(PipelineConfig, argv, prog="rlhf-jax pipeline")
    try:
        run_pipeline(cfg)
    except Stopped as e:
        print(f"[pipeline] stopped during {e}; continue with: rlhf-jax pipeline --resume --out {cfg.out}",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

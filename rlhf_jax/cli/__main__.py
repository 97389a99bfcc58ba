"""`python -m rlhf_jax.cli COMMAND ...`: the same as the `rlhf-jax` console command."""
from rlhf_jax.cli import main

raise SystemExit(main())

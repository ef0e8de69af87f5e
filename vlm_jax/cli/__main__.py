"""`python -m vlm_jax.cli COMMAND ...` is `vlm-jax COMMAND ...`."""
import sys

from vlm_jax.cli import main

sys.exit(main())

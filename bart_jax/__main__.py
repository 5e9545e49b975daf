import sys

from bart_jax.cli import main

sys.exit(main())

import sys

from bart_jax.apps.cli import main

sys.exit(main())

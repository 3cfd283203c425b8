import sys

from jax_brainage.cli import main

sys.exit(main())

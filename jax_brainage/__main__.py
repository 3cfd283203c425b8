import sys

from jax_brainage.cli import main

if __name__ == "__main__":
  sys.exit(main())

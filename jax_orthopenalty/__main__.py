"""``python -m jax_orthopenalty``: the demo, in :mod:`jax_orthopenalty.demo`."""

import sys

from jax_orthopenalty.demo import main

if __name__ == "__main__":
    sys.exit(main())

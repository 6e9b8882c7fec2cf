"""``python -m rlhf_fast ...`` is the ``rlhf-fast`` command (works under torchrun too)."""
import sys

from rlhf_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())

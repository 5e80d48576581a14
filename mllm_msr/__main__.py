"""``python -m mllm_msr <stage|pipeline> [args]``: the ``mllm-msr`` console script."""

import sys

from mllm_msr.cli import main

sys.exit(main())

"""``python -m llmq`` (and ``torchrun ... -m llmq quantize ...``): the command line."""

import sys

from llmq.cli import main

sys.exit(main())

"""`python -m eureka_megatron.cli` (what torchrun and the launch scripts run)."""
import sys

from eureka_megatron.cli import main

sys.exit(main())

"""`python -m dreambooth_offset ...` is `dreambooth-offset ...`."""
import sys

from dreambooth_offset.cli import main

sys.exit(main())

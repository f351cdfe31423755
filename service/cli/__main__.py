"""`python -m compacs.service.cli`: the tests and benchmarks start the CLI this way."""

import sys

from compacs.service.cli.entry import main

sys.exit(main())

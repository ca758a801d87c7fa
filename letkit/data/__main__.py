"""``python -m letkit.data``: the same as ``letkit tokenize``."""

import sys

from letkit.data.shards import main

sys.exit(main())

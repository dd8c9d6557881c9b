"""``python scripts/supervise.py run workers/wordcount.py``: the ``routilux-mp`` command from a checkout."""

from routilux_mp.cli import main

raise SystemExit(main())

"""``python -m routilux_mp``: the ``routilux-mp`` command (see :mod:`routilux_mp.cli`)."""

from routilux_mp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m wan_i2v``: the `wan-i2v` command."""

from wan_i2v.cli import run

if __name__ == "__main__":
    run()

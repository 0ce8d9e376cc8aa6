"""``python -m vitpcm`` is the ``vitpcm`` command."""

from vitpcm.cli import entry

if __name__ == "__main__":
    entry()

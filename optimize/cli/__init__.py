"""The command line: `optimize run|quantize|distill|compile` build a recipe and hand it to the
pipeline (`commands.py`); `inspect`, `bench`, `serve`, `cache` and the others are `tools.py`."""

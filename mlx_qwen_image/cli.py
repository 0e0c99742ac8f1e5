"""The ``mlx-qwen-image`` command: parse, call the library, report. No model logic lives here."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-qwen-image")
def cli():
    """Qwen-Image text-to-image and image editing on Apple Silicon (MLX)."""


def main():
    cli()


if __name__ == "__main__":
    main()

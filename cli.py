"""Run the ``landscape`` command line from a checkout: ``python cli.py --help``."""

from landscape.cli import main

if __name__ == "__main__":
    main()

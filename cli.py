"""Run the bolmo-async CLI from a checkout: ``python cli.py --help``."""

from bolmo_async.entry import main

if __name__ == "__main__":
    main()

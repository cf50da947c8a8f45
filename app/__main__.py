"""`python -m app [--host H] [--port P] [--checkpoint DIR]`: serve Seedling (see app/cli.py)."""

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

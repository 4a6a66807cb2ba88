"""`python -m llfc_core run ...`: the book's headless driver (`llfc_core.book.cli`)."""
import sys

from .book.cli import main

if __name__ == "__main__":
    sys.exit(main())

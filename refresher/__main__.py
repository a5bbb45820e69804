"""`python -m refresher` is the same as the `refresher` console script."""

from refresher.cli import main

if __name__ == "__main__":
    main()

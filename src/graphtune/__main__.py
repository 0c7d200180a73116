"""`python -m graphtune ...` is the `graphtune` command."""

from graphtune.cli import main

if __name__ == "__main__":
    main()

"""`python -m llmshrink` is the `llmshrink` command."""

from llmshrink.cli import main

if __name__ == "__main__":
    main()

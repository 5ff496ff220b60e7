"""`python -m caffetune`: the same as the `caffetune` command."""
from caffetune.cli import main

main()

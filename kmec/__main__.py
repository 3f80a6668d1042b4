"""``python -m kmec`` runs the command line."""

from kmec.cli import main

if __name__ == "__main__":
    main()

"""Allow `python -m mailmerge_gov`."""

from mailmerge_gov.cli import main

if __name__ == "__main__":
    main()

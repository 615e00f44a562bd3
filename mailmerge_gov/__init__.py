"""mailmerge-gov: consolidate the mail systems and staff directories of merged agencies."""

__version__ = "0.1.0"

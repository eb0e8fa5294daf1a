"""bitcli: the `bit` command-line tool for Big Transfer (BiT) image classifiers."""

__version__ = "0.1.0"

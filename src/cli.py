"""Command-line helpers shared by the scripts: every user error is one line on stderr."""
import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, bad value) are one line, not usage + error."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")


def parser(description):
    return Parser(description=description)


def fail(message, code=2):
    sys.stderr.write(f"error: {message}\n")   # one write: whole lines even from several ranks
    sys.stderr.flush()
    sys.exit(code)

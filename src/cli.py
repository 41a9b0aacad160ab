"""Command-line helpers shared by the scripts: every user error is one line on stderr."""
import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, bad value) are one line, not usage + error."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")


def parser(script, doc):
    """The parser of `script` (its __file__), described by the first paragraph of `doc`; its
    name in messages is the script's, however it was started (python src/x.py, or main())."""
    return Parser(prog=os.path.basename(script), description=doc.split("\n\n")[0])


def fail(message, code=2):
    sys.stderr.write(f"error: {message}\n")   # one write: whole lines even from several ranks
    sys.stderr.flush()
    sys.exit(code)

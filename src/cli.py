"""Command-line helpers shared by the scripts: every user error is one line on stderr."""
import argparse
import os
import sys


def parser(description):
    """An ArgumentParser whose errors (unknown flag, bad value) are one line, not usage + error."""
    p = argparse.ArgumentParser(description=description)
    prog = os.path.basename(sys.argv[0])
    p.error = lambda message: fail(f"{prog}: {message} (see --help)")
    return p


def fail(message, code=2):
    sys.stderr.write(f"error: {message}\n")   # one write: whole lines even from several ranks
    sys.stderr.flush()
    sys.exit(code)

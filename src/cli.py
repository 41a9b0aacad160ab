"""Command-line helpers shared by the scripts: every user error is one line on stderr."""
import argparse
import os
import sys

from device import CHOICES as DEVICES
from precision import CHOICES as PRECISIONS


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, bad value) are one line, not usage + error."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")


def parser(script, doc):
    """The parser of `script` (its __file__), described by the first paragraph of `doc`; its
    name in messages is the script's, however it was started (python src/x.py, or main())."""
    return Parser(prog=os.path.basename(script), description=doc.split("\n\n")[0])


def add_device_flags(p, precision_note="", precision_default="auto"):
    """--device and --precision, as every script takes them; `precision_note` says what the
    precision covers in this script."""
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda, then xpu, then mps, then cpu")
    p.add_argument("--precision", default=precision_default, choices=PRECISIONS,
                   help="fp32 (on CUDA with TF32 off), or bf16: matmuls in bf16 under "
                        "autocast; auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, "
                        "fp32 elsewhere" + (f". {precision_note}" if precision_note else ""))


def fail(message, code=2):
    sys.stderr.write(f"error: {message}\n")   # one write: whole lines even from several ranks
    sys.stderr.flush()
    sys.exit(code)

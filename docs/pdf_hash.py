"""The hash docs/model.pdf carries of the sources it was built from: model.tex and the files it
reads (\\input from docs/, \\includegraphics from docs/resources). build_pdf.sh writes it
into the PDF's metadata; tests/test_docs.py compares it with the checkout's, so a stale PDF
fails the tests.

    python docs/pdf_hash.py      # prints the hash of the sources as they are now
"""
import hashlib
import os
import re

DOCS = os.path.dirname(os.path.abspath(__file__))


def sources():
    tex = os.path.join(DOCS, "model.tex")
    with open(tex) as f:
        text = f.read()
    inputs = [os.path.join(DOCS, name) for name in re.findall(r"\\input\{([^}]*)\}", text)]
    images = [os.path.join(DOCS, "resources", name) for name in
              re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}]*)\}", text)]
    return [tex] + sorted(inputs + images)


def source_hash():
    digest = hashlib.sha256()
    for path in sources():
        digest.update(os.path.relpath(path, DOCS).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


if __name__ == "__main__":
    print(source_hash())

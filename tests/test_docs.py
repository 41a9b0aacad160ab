"""docs/model.pdf is current: built by docs/build_pdf.sh from this checkout's model.tex and
figures (no TeX needed to check it)."""
import os
import re
import sys

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs")
sys.path.insert(0, DOCS)
import pdf_hash  # noqa: E402  (docs/ is not a package)


def read(name):
    with open(os.path.join(DOCS, name), "rb") as f:
        return f.read()


def test_the_pdf_is_built_from_the_current_tex_and_figures():
    found = re.search(rb"/Subject\s*\(sources sha256 ([0-9a-f]{64})\)", read("model.pdf"))
    assert found, "docs/model.pdf carries no source hash: build it with docs/build_pdf.sh"
    assert found.group(1).decode() == pdf_hash.source_hash(), (
        "docs/model.pdf is older than docs/model.tex or its figures (docs/figures, "
        "docs/resources): run docs/build_pdf.sh and commit the PDF with them")


def test_the_write_up_covers_every_shipped_network_with_its_figures():
    tex = read("model.tex").decode()
    figures = "".join(read(os.path.join("figures", name)).decode()
                      for name in sorted(os.listdir(os.path.join(DOCS, "figures"))))
    sections = re.findall(r"\\section\{([^}]*)\}", tex)
    assert sections == ["The seed network", "Forward pass of the hand-written convolution",
                        "Gradient flow", "The fast94 network",
                        "The fine-tuned EfficientNet-Lite0", "Measured"]
    macros = re.findall(r"\\newcommand\{\\(\w+figure)\}", figures)
    assert len(macros) == 6 and all(f"\\{m}\n" in tex for m in macros), macros
    assert tex.count("\\includegraphics") == 2        # the measured training curves
    for name in re.findall(r"\\includegraphics\[[^]]*\]\{([^}]*)\}", tex):
        assert os.path.exists(os.path.join(DOCS, "resources", name)), name

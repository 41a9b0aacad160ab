#!/usr/bin/env bash
# Builds docs/model.pdf from docs/model.tex and its figures (docs/figures, docs/resources), with
# the hash of those sources in the PDF's metadata: tests/test_docs.py fails when the PDF is
# older than its sources. Whoever changes them runs this and commits the PDF with them.
#
#     docs/build_pdf.sh
#
# Needs pdflatex and latexmk (TeX Live); where they are missing it installs them with apt-get
# (as root), or says how to.
set -euo pipefail
cd "$(dirname "$0")"
TEX_PACKAGES="texlive-latex-base texlive-latex-extra texlive-pictures latexmk"

if ! command -v pdflatex >/dev/null || ! command -v latexmk >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "TeX is missing: apt-get install $TEX_PACKAGES" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $TEX_PACKAGES >/dev/null
    else
        echo "error: pdflatex and latexmk are missing: install TeX Live (Debian/Ubuntu: sudo" \
             "apt-get install $TEX_PACKAGES; elsewhere TeX Live or MiKTeX) and run $0 again" >&2
        exit 1
    fi
fi

hash=$("${PYTHON:-python3}" pdf_hash.py)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
if ! latexmk -pdf -interaction=nonstopmode -halt-on-error -output-directory="$build" \
        -usepretex="\\def\\sourcehash{$hash}" model.tex >"$build/latexmk.out" 2>&1; then
    grep -A5 '^!' "$build/model.log" >&2 || tail -20 "$build/latexmk.out" >&2
    echo "error: pdflatex failed on docs/model.tex (its messages above)" >&2
    exit 1
fi
cp "$build/model.pdf" model.pdf
echo "wrote docs/model.pdf from sources $hash"

"""A benchmark mix of unique, real-looking web-sized documents that looks like bolmo_mix.

Four kinds of text, each in its own source folder (so each can be measured alone with
``--include 'data/<source>/*'``), in these shares of the text bytes:

- ``common_crawl`` (prose, 55%): a word-bigram model trained on the prose of Python's standard
  library (docstrings) writes documents of 1-8 KB, with numbers, dates, prices, identifiers, URLs
  and a few multilingual sentences.
- ``stack_edu`` (code, 20%: StackEdu is 26.3B of bolmo_mix's 172.7B tokens, 15%, and web pages
  carry code too): Python (windows of the standard library's real modules, a third of their
  identifiers renamed and their numbers changed), C-like and JS-like sources built from templates:
  many short indented lines, quotes and backslashes inside strings and regexes, so 5-6% of the
  JSON bytes are escapes as in real code.
- ``web_markup`` (markup and tables, 15%): HTML tables and pages (attributes in double quotes),
  Markdown with pipe tables and lists, LaTeX (sections, tabulars, equations: backslashes).
- ``multilingual`` (non-Latin scripts, 10%): Chinese, Japanese, Korean, Russian, Arabic, Hindi,
  Greek and Thai, words drawn from each script's letters (``unicodedata``), a quarter of the files
  written with ``\\uXXXX`` escapes (``json.dumps``' default, common in published datasets).

Every document is built from a seeded ``random.Random`` and carries text no other document has
(new names, numbers, word sequences), so a tokenizer that caches documents, segments or words
gains only what it would gain on real text. Nothing is downloaded; the same seed and Python give
the same bytes. Laid out like bolmo_mix: ``data/<source>/<source>-NNNN.jsonl.zst``.
"""

from __future__ import annotations

import itertools
import json
import keyword
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import zstandard

from bolmo_async.mirror.sample import MULTILINGUAL, _corpus

#: (source folder, share of the text bytes, kind of text)
KINDS: tuple[tuple[str, float, str], ...] = (
    ("common_crawl", 0.55, "prose"),
    ("stack_edu", 0.20, "code"),
    ("web_markup", 0.15, "markup"),
    ("multilingual", 0.10, "scripts"),
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[0-9]+|[.,;:!?()]")
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
_NUMBER = re.compile(r"\b[0-9]+\b")


def _model(prose: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    nxt: dict[str, list[str]] = defaultdict(list)
    starts: list[str] = []
    for doc in prose:
        words = _WORD.findall(doc)
        if not words:
            continue
        starts.append(words[0])
        for a, b in itertools.pairwise(words):
            nxt[a].append(b)
    return dict(nxt), starts


def _name(rng: random.Random, parts: int = 0) -> str:
    syll = ("ka", "lo", "mer", "tin", "dex", "qu", "ra", "vel", "sto", "pri", "gon", "ul", "zen", "bar", "fi")
    return "".join(rng.choice(syll) for _ in range(parts or rng.randint(2, 4)))


def _novel(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return str(rng.randint(0, 10 ** rng.randint(1, 7)))
    if r < 0.45:
        return f"{rng.randint(1990, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if r < 0.6:
        return f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
    if r < 0.8:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 11))).capitalize()
    return f"https://www.{rng.choice(['example', 'news', 'shop', 'blog', 'wiki'])}{rng.randint(1, 9999)}.org/{rng.getrandbits(32):x}"


class _Gen:
    """Document writers of each kind, sharing the bigram model and the stdlib's code."""

    def __init__(self, rng: random.Random):
        prose, code = _corpus(8_000_000)
        self.rng = rng
        self.nxt, self.starts = _model(prose)
        self.code = [c for c in code if len(c) > 2000]
        self.idents = sorted({w for c in self.code[:200] for w in _IDENT.findall(c)} - set(keyword.kwlist))
        self.scripts = _scripts()

    # -- prose -----------------------------------------------------------------------------
    def words(self, n_chars: int, novel: float = 0.04) -> str:
        rng, nxt, starts = self.rng, self.nxt, self.starts
        out: list[str] = []
        n = 0
        word = rng.choice(starts)
        while n < n_chars:
            if rng.random() < novel:
                tok = _novel(rng)
            else:
                choices = nxt.get(word)
                word = rng.choice(choices) if choices else rng.choice(starts)
                tok = word
            if tok in ".,;:!?)" and out:
                out[-1] += tok
            else:
                out.append(tok)
            n += len(tok) + 1
        return " ".join(out)

    def prose(self, size: int) -> str:
        rng = self.rng
        paras: list[str] = []
        n = 0
        while n < size:
            p = self.words(rng.randint(200, 1200))
            if rng.random() < 0.05:
                p = rng.choice(MULTILINGUAL) + " " + p
            paras.append(p)
            n += len(p) + 2
        return "\n\n".join(paras)

    # -- code ------------------------------------------------------------------------------
    def code_doc(self, size: int) -> str:
        r = self.rng.random()
        return self.python(size) if r < 0.5 else self.c_like(size) if r < 0.75 else self.js_like(size)

    def python(self, size: int) -> str:
        rng = self.rng
        src = rng.choice(self.code)
        lines = src.split("\n")
        start = rng.randrange(max(1, len(lines) - 40))
        out: list[str] = []
        n = 0
        for line in itertools.islice(itertools.cycle(lines), start, None):
            out.append(line)
            n += len(line) + 1
            if n >= size:
                break
        text = "\n".join(out)
        # A third of the identifiers get names no document had; numbers change.
        names = {w: _name(rng) + "_" + w[:3] for w in sorted(set(_IDENT.findall(text))) if rng.random() < 0.33}
        names = {k: v for k, v in names.items() if k not in keyword.kwlist}
        text = _IDENT.sub(lambda m: names.get(m.group(), m.group()), text)
        text = _NUMBER.sub(lambda m: str(rng.randint(0, 4096)) if rng.random() < 0.5 else m.group(), text)
        return f'"""{self.words(rng.randint(40, 160))}"""\n{_strings_py(rng)}\n{text}\n'

    def _ident(self) -> str:
        rng = self.rng
        return rng.choice(self.idents) if rng.random() < 0.6 else _name(rng) + str(rng.randint(0, 99))

    def c_like(self, size: int) -> str:
        rng = self.rng
        out = [
            f"/* {self.words(rng.randint(60, 200))} */",
            "#include <stdio.h>",
            "#include <string.h>",
            f'#include "{_name(rng)}.h"',
            "",
            f"#define {_name(rng).upper()}_MAX {rng.randint(16, 65536)}",
            "",
        ]
        n = sum(map(len, out))
        while n < size:
            fn, buf, i, k = self._ident(), self._ident(), self._ident(), self._ident()
            body = [
                f"static int {fn}(const char *{buf}, size_t len)",
                "{",
                f"    int {k} = {rng.randint(0, 255)};",
                f"    for (size_t {i} = 0; {i} < len; {i}++) {{",
                f"        if ({buf}[{i}] == '\\\\' || {buf}[{i}] == '\\n') {{",
                f'            fprintf(stderr, "{fn}: bad byte %d at %zu\\n", {buf}[{i}], {i});',
                f"            {k} += {rng.randint(1, 9)};",
                "        } else if (" + buf + "[" + i + "] == '\"') {",
                f'            snprintf(out, sizeof out, "\\"%s\\"\\t%d", "{self._ident()}", {k});',
                "        }",
                "    }",
                f"    return {k} > {rng.randint(0, 1000)} ? -1 : {k};  /* {self.words(rng.randint(20, 60))} */",
                "}",
                "",
            ]
            if rng.random() < 0.5:
                body[3:3] = [
                    f'    const char *path = "C:\\\\{_name(rng)}\\\\{_name(rng)}.txt";',
                    f"    {k} = strlen(path) + {rng.randint(0, 99)};",
                ]
            out += body
            n += sum(map(len, body)) + len(body)
        return "\n".join(out)

    def js_like(self, size: int) -> str:
        rng = self.rng
        out = [f"// {self.words(rng.randint(40, 120))}", "'use strict';", ""]
        n = sum(map(len, out))
        while n < size:
            fn, a, b = self._ident(), self._ident(), self._ident()
            body = [
                f"export async function {fn}({a}, {b} = {{}}) {{",
                '  const re = /^\\s*([A-Za-z_]\\w*)\\s*=\\s*"((?:[^"\\\\]|\\\\.)*)"/g;',
                f"  const url = `/api/{_name(rng)}/${{encodeURIComponent({a})}}?n={rng.randint(1, 999)}`;",
                f"  if (!{a}) throw new Error(\"{fn}: missing '{a}'\\n\");",
                "  const res = await fetch(url, { headers: { 'Content-Type': 'application/json' } });",
                f'  const text = JSON.stringify({{ "{b}": {a}, "note": "{self.words(rng.randint(20, 60))}" }});',
                "  return text.replace(re, (m, k, v) => k + '=' + v.replace(/\\\\n/g, '\\n'));",
                "}",
                "",
            ]
            out += body
            n += sum(map(len, body)) + len(body)
        return "\n".join(out)

    # -- markup ----------------------------------------------------------------------------
    def markup(self, size: int) -> str:
        r = self.rng.random()
        return self.html(size) if r < 0.4 else self.markdown(size) if r < 0.75 else self.latex(size)

    def _cell(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return f"{rng.uniform(0, 10 ** rng.randint(1, 5)):.{rng.randint(0, 3)}f}"
        if r < 0.5:
            return _novel(rng)
        return self.words(rng.randint(3, 30), novel=0.1)

    def html(self, size: int) -> str:
        rng = self.rng
        out = [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>{self.words(30)}</title></head>',
            "<body>",
        ]
        n = sum(map(len, out))
        while n < size:
            cols = rng.randint(2, 6)
            part = [
                f'<h2 id="{_name(rng)}">{self.words(rng.randint(10, 50))}</h2>',
                f'<p class="lead">{self.words(rng.randint(100, 400))} <a href="{_novel(rng)}">{self.words(12)}</a></p>',
                f'<table class="data {_name(rng)}" border="1">',
                "  <tr>" + "".join(f'<th scope="col">{self.words(8)}</th>' for _ in range(cols)) + "</tr>",
            ]
            for _ in range(rng.randint(2, 12)):
                part.append("  <tr>" + "".join(f'<td align="right">{self._cell()}</td>' for _ in range(cols)) + "</tr>")
            part.append("</table>")
            out += part
            n += sum(map(len, part)) + len(part)
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self, size: int) -> str:
        rng = self.rng
        out = [f"# {self.words(rng.randint(10, 40))}", ""]
        n = sum(map(len, out))
        while n < size:
            cols = rng.randint(2, 5)
            part = [
                f"## {self.words(rng.randint(10, 40))}",
                "",
                self.words(rng.randint(100, 400)) + f" See [{self.words(10)}]({_novel(rng)}) and `{self._ident()}()`.",
                "",
                "| " + " | ".join(self.words(8) for _ in range(cols)) + " |",
                "|" + "|".join(rng.choice(["---", ":---", "---:", ":---:"]) for _ in range(cols)) + "|",
            ]
            part += ["| " + " | ".join(self._cell() for _ in range(cols)) + " |" for _ in range(rng.randint(2, 10))]
            part += [
                "",
                *(f"- **{self.words(6)}**: {self.words(rng.randint(20, 80))}" for _ in range(rng.randint(0, 4))),
            ]
            part.append("")
            out += part
            n += sum(map(len, part)) + len(part)
        return "\n".join(out)

    def latex(self, size: int) -> str:
        rng = self.rng
        out = ["\\documentclass{article}", "\\usepackage{amsmath}", "\\begin{document}"]
        n = sum(map(len, out))
        greek = ("alpha", "beta", "gamma", "delta", "lambda", "mu", "sigma", "theta", "omega")
        while n < size:
            cols = rng.randint(2, 5)
            g1, g2 = rng.choice(greek), rng.choice(greek)
            part = [
                f"\\section{{{self.words(rng.randint(10, 40))}}}\\label{{sec:{_name(rng)}}}",
                self.words(rng.randint(100, 500))
                + f" (see Table~\\ref{{tab:{_name(rng)}}} and \\cite{{{_name(rng)}{rng.randint(1990, 2025)}}}).",
                "\\begin{equation}",
                f"  \\frac{{\\partial {g1}}}{{\\partial t}} = \\sum_{{i=1}}^{{{rng.randint(2, 99)}}} \\{g2}_i x_i^{{{rng.randint(2, 9)}}} + \\sqrt{{\\{g1}}}",
                "\\end{equation}",
                "\\begin{tabular}{" + "l" + "r" * (cols - 1) + "}",
                "\\hline",
            ]
            part += [" & ".join(self._cell() for _ in range(cols)) + " \\\\" for _ in range(rng.randint(2, 10))]
            part += ["\\hline", "\\end{tabular}", ""]
            out += part
            n += sum(map(len, part)) + len(part)
        out.append("\\end{document}")
        return "\n".join(out)

    # -- scripts ---------------------------------------------------------------------------
    def script_doc(self, size: int) -> str:
        rng = self.rng
        _script, (letters, lo, hi, space, stops) = rng.choice(sorted(self.scripts.items()))
        paras: list[str] = []
        n = 0
        while n < size:
            words: list[str] = []
            for _ in range(rng.randint(20, 120)):
                w = "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))
                if rng.random() < 0.03:
                    w = str(rng.randint(1, 99999))
                elif rng.random() < 0.1:
                    w += rng.choice(stops)
                words.append(w)
            p = space.join(words) + stops[0]
            paras.append(p)
            n += len(p.encode("utf-8")) + 1
        return "\n".join(paras)


def _strings_py(rng: random.Random) -> str:
    """A few module constants with escapes, as real modules have (regexes, paths, format strings)."""
    name = _name(rng).upper()
    return (
        f'{name}_RE = re.compile(r\'^(\\d{{{rng.randint(1, 4)}}})\\s+"([^"]*)"\\.\\w+$\')\n'
        f'{name}_PATH = "C:\\\\{_name(rng)}\\\\{_name(rng)}\\\\{rng.randint(0, 999)}.log"\n'
        f"{name}_FMT = '%s:\\t%d\\n' % ('{_name(rng)}', {rng.randint(0, 99999)})"
    )


def _scripts() -> dict[str, tuple[str, int, int, str, str]]:
    """Per script: (letters, shortest and longest word, word separator, sentence stops)."""

    def block(lo: int, hi: int, cats: tuple[str, ...] = ("Lo", "Ll")) -> str:
        return "".join(chr(c) for c in range(lo, hi) if unicodedata.category(chr(c)) in cats)

    cjk = block(0x4E00, 0x4E00 + 3500)  # the most common ideographs come first in the block
    return {
        "chinese": (cjk, 1, 3, "", "。，、"),
        "japanese": (block(0x3041, 0x3097) * 3 + block(0x30A1, 0x30FB) + cjk[:1500], 1, 4, "", "。、"),
        "korean": ("".join(chr(0xAC00 + i) for i in range(0, 11172, 7)), 1, 4, " ", ".,"),
        "russian": (block(0x0430, 0x0450), 2, 10, " ", ".,;"),
        "arabic": (block(0x0621, 0x064B), 2, 8, " ", ".،؛"),
        "hindi": (block(0x0915, 0x0939) + block(0x093E, 0x094D, ("Mc", "Mn")), 2, 7, " ", "।,"),
        "greek": (block(0x03B1, 0x03CA), 2, 10, " ", ".,·"),
        "thai": (block(0x0E01, 0x0E31), 2, 8, "", " "),
    }


def build_bench_mix(folder: Path, size_mb: float, seed: int = 1, files_per_source: int = 4) -> dict[str, object]:
    """Write ``size_mb`` MB of unique documents as .jsonl.zst in bolmo_mix's layout, one source
    per kind of text (``KINDS``); returns counts overall and per kind."""
    rng = random.Random(seed)
    gen = _Gen(rng)
    writers: dict[str, Callable[[int], str]] = {
        "prose": gen.prose,
        "code": gen.code_doc,
        "markup": gen.markup,
        "scripts": gen.script_doc,
    }
    total = int(size_mb * 1_000_000)
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    kinds: dict[str, dict[str, object]] = {}
    for source, share, kind in KINDS:
        d = folder / "data" / source
        d.mkdir(parents=True, exist_ok=True)
        budget = int(total * share)
        docs = text = escapes = json_bytes = 0
        for f in range(files_per_source):
            ascii_only = kind == "scripts" and f == files_per_source - 1
            lines: list[bytes] = []
            made = 0
            while made < budget // files_per_source:
                t = writers[kind](rng.randint(1000, 8000))
                rec = {"id": f"{source}-{f:04d}-{len(lines):07d}", "text": t, "source": source}
                line = json.dumps(rec, ensure_ascii=ascii_only).encode("utf-8")
                lines.append(line)
                escapes += line.count(b"\\")
                made += len(t.encode("utf-8"))
            blob = b"\n".join(lines) + b"\n"
            json_bytes += len(blob)
            (d / f"{source}-{f:04d}.jsonl.zst").write_bytes(cctx.compress(blob))
            docs += len(lines)
            text += made
        kinds[kind] = {
            "source": source,
            "documents": docs,
            "text_bytes": text,
            "escapes_per_json_byte": round(escapes / json_bytes, 4),
        }
    return {
        "documents": sum(int(k["documents"]) for k in kinds.values()),  # type: ignore[call-overload]
        "text_bytes": sum(int(k["text_bytes"]) for k in kinds.values()),  # type: ignore[call-overload]
        "kinds": kinds,
    }


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    print(json.dumps(build_bench_mix(Path(sys.argv[1]), float(sys.argv[2])), indent=1))
    print(f"{time.perf_counter() - t0:.1f} s")

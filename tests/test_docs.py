"""End-to-end check of the offline docs build (`posttrain-docs`): build the site once, then load every page in
headless Chromium with the network off and check what a reader sees. Needs `chromium` (apt) and npm (for MathJax 3
and the widgets manager, fetched once)."""
import json, re
from pathlib import Path

import pytest

from posttrain_nb.docs import broken_links, build_site, sidebar_sections, write_readme
from browser import CHROMIUM, OfflineBrowser

ROOT = Path(__file__).resolve().parents[1]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# what a page shows, without code, rendered math and scripts; and its explorer cells
FACTS_JS = r"""(() => {
  const art = document.querySelector('article') || document.body;
  const k = art.cloneNode(true);
  k.querySelectorAll('pre, code, mjx-container, script, style, .highlight').forEach(e => e.remove());
  const cells = Array.from(document.querySelectorAll('div.cell'));
  const interact = cells.filter(c => {
    const i = c.querySelector('.cell_input'); return i && /\binteract(_manual)?\s*\(|@interact/.test(i.innerText); });
  const shows = c => { const o = c.querySelector('.cell_output'); if (!o) return false;   // the explorer's own output:
    const outs = o.querySelectorAll('.widget-output, .jupyter-widgets-output-area');          // a figure or some text
    return Array.from(outs).some(w => w.querySelector('img, svg') || w.innerText.trim().length > 0); };
  return {text: k.innerText, body: document.body.innerText, interact: interact.length,
          empty_interact: interact.filter(c => !shows(c)).length};
})()"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("docs") / "site")


def pages(site):
    return sorted(p for p in site.glob("*.html") if p.name not in ("genindex.html", "search.html"))


@pytest.fixture(scope="module")
def rendered(site):
    "{page name: (requests that failed or left the machine, facts from FACTS_JS)} for every page, network off."
    if CHROMIUM is None: pytest.skip("chromium is not installed (apt-get install -y chromium)")
    b, out = OfflineBrowser(), {}
    try:
        for page in pages(site):   # ready once every explorer has drawn (or the page has none): no fixed sleep
            out[page.name] = (b.visit(page.as_uri(), ready=f"{FACTS_JS}.empty_interact === 0"), b.eval(FACTS_JS))
    finally:
        b.close()
    return out


def test_pages_and_offline_assets(site):
    for page in ("index", "core", "tasks", "zoo", "sft", "pipeline", "docs", "search"):
        assert (site / f"{page}.html").exists(), page
    assert (site / "_static/mathjax/tex-chtml-full.js").exists() and (site / "_static/widgets/embed-amd.js").exists()
    html = (site / "core.html").read_text()
    assert "_static/mathjax/tex-chtml-full.js" in html and "cdn.jsdelivr" not in html and "cdnjs" not in html
    assert "{target=" not in html and "#| " not in html


def test_internal_links_and_anchors_resolve(site):
    assert broken_links(site) == []


def test_landing_page_links_chapters_locally(site):
    index = (site / "index.html").read_text()
    assert "posttrain-nb.github.io" not in index
    assert 'href="core.html"' in index and 'href="dpo.html"' in index


def test_sidebar_has_the_course_parts_in_order(site):
    index = (site / "index.html").read_text()
    parts = [caption for caption, _ in sidebar_sections(ROOT / "nbs")]
    assert parts[0] == "00 foundations" and parts[-1] == "90 capstone"
    where = [index.find(f">{p}<") for p in parts]
    assert all(w > 0 for w in where) and where == sorted(where), list(zip(parts, where))


def test_chrome_author_and_notebook_download(site):
    for page in pages(site): assert "Author name not set" not in page.read_text(), page.name
    dpo = (site / "dpo.html").read_text()
    link = re.search(r'href="(_static/notebooks/22_dpo\.ipynb)"', dpo)
    assert link, "the DPO page has no link to download its notebook"
    nb = json.loads((site / link[1]).read_text())
    assert nb["cells"] and any("dpo_loss" in "".join(c["source"]) for c in nb["cells"])


def test_api_entries_have_parameter_tables(site):
    core = (site / "core.html").read_text()
    assert "example.invalid" not in core and ">source<" not in core
    assert re.search(r'<span class="k">class</span>(?:<span[^>]*>\s*</span>)?<span[^>]*>TrainConfig', core), \
        "a dataclass should read as a class"
    assert re.search(r'<td[^>]*>(?:<p>)?<code[^>]*><span class="pre">steps</span></code>(?:</p>)?</td>', core), \
        "TrainConfig has no parameter table"


@needs_chromium
def test_no_request_fails_or_leaves_the_machine(rendered):
    bad = {p: b for p, (b, _) in rendered.items() if b}
    assert not bad, bad


@needs_chromium
def test_no_unrendered_math(rendered):
    for page, (_, facts) in rendered.items():
        for raw in ("$$", "\\mathcal", "\\frac", "\\begin{"):
            assert raw not in facts["text"], f"{page}: {raw!r} shows as text"


@needs_chromium
def test_every_explorer_renders_offline(rendered):
    assert rendered["dpo.html"][1]["interact"] >= 1          # the detection itself works
    empty = {p: f["empty_interact"] for p, (_, f) in rendered.items() if f["empty_interact"]}
    assert not empty, f"explorers with an empty output area: {empty}"


@needs_chromium
def test_no_builder_paths_on_any_page(rendered):
    path = re.compile(r"(?<![\w.:/~-])/(?:tmp|work|root|home|Users|opt|usr|var|private|mnt)/\S+")
    found = {p: path.findall(f["body"])[:3] for p, (_, f) in rendered.items() if path.search(f["body"])}
    assert not found, found


def test_readme_keeps_shell_commands(tmp_path):
    readme = write_readme(dest=tmp_path / "README.md").read_text()
    assert readme.startswith("# posttrain_nb")
    assert '```sh\npip install -e ".[dev]" && posttrain-pipeline\n```' in readme
    # the test command CI greps from the README: a shell block of its own, running nbdev-test then pytest
    assert re.search(r"```sh\nOMP_NUM_THREADS=1 nbdev-test[^\n]* && pytest[^\n]*\n```", readme)
    assert "{target=" not in readme

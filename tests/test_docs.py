"""End-to-end check of the offline docs build (`posttrain-docs`): build the site, render a page with math in headless
Chromium, and check that every internal link resolves. Needs `chromium` (apt) and npm (for MathJax 3, once)."""
import re, shutil, subprocess, tempfile

import pytest

from posttrain_nb.docs import broken_links, build_site, write_readme

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("docs") / "site")


def dump_dom(page):
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run",
                              f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_pages_and_offline_assets(site):
    for page in ("index", "core", "tasks", "zoo", "sft", "pipeline", "docs", "search"):
        assert (site / f"{page}.html").exists(), page
    assert (site / "_static/mathjax/tex-chtml-full.js").exists()
    html = (site / "core.html").read_text()
    assert "_static/mathjax/tex-chtml-full.js" in html and "cdn.jsdelivr" not in html
    assert "{target=" not in html and "#| " not in html
    index = (site / "index.html").read_text()
    assert 'href="core.html"' in index and 'href="docs.html"' in index   # sidebar, in reading order
    assert index.index('href="core.html"') < index.index('href="docs.html"')


def test_internal_links_resolve(site):
    assert broken_links(site) == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_math_renders_in_chromium(site):
    dom = dump_dom(site / "core.html")
    assert "<mjx-container" in dom, "MathJax did not typeset the core chapter's math"


def test_readme_keeps_shell_commands(tmp_path):
    readme = write_readme(dest=tmp_path / "README.md").read_text()
    assert readme.startswith("# posttrain_nb")
    assert '```sh\npip install -e ".[dev]" && posttrain-pipeline\n```' in readme
    # the test command CI greps from the README: a shell block of its own, running nbdev-test then pytest
    assert re.search(r"```sh\nOMP_NUM_THREADS=1 nbdev-test[^\n]* && pytest[^\n]*\n```", readme)
    assert "{target=" not in readme

"""README.md carries exactly the supported-architecture table generated from the registry."""

from pathlib import Path

from engine.models import ARCHITECTURES, TESTED, support_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- archs:start -->", "<!-- archs:end -->"


def test_every_registered_architecture_has_a_row():
    table = support_table_markdown()
    for arch in ARCHITECTURES:
        assert f"| `{arch}` |" in table and arch in TESTED


def test_readme_has_the_generated_table():
    text = README.read_text()
    assert START in text and END in text, f"README.md needs {START} ... {END} around the architecture table"
    inner = text.split(START, 1)[1].split(END, 1)[0]
    assert inner.strip() == support_table_markdown().strip(), \
        "README's architecture table is stale: paste engine.models.support_table_markdown()"

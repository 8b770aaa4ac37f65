"""The paragraph-tree rules (docs/design.md) on small exact cases, and restoration on generated markdown-like text."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apar.data.rules import TreeRules, build_tree, first_sentence_end
from apar.data.tree import Fork, Node, TreeError, restore, thread_texts, validate


def leaf(text: str) -> Fork:
    return Fork(Node([text]))


def roots(text: str, rules: TreeRules | None = None) -> list[str]:
    """The root thread's text with [Fork] markers, and each child's text, in pre-order."""
    return [t.text for t in thread_texts(build_tree(text, rules))]


def test_numbered_list_with_plain_titles():
    text = "Three tips:\n\n1. Sleep: go to bed early.\n2. Eat: more greens.\n3. Walk: every day.\n\nGood luck!"
    assert build_tree(text) == Node([
        "Three tips:\n\n1. Sleep:", leaf(" go to bed early."),
        "\n2. Eat:", leaf(" more greens."),
        "\n3. Walk:", leaf(" every day."),
        "\n\nGood luck!",
    ])


@pytest.mark.parametrize("title", ["**Sleep**:", "**Sleep:**", "**Sleep.**", "**Sleep** -"])
def test_bold_title_forms(title):
    items = [title.replace("Sleep", name) for name in ("Sleep", "Eat", "Walk")]
    text = "\n\n".join(f"{n}. {t} Details {n}." for n, t in enumerate(items, start=1))
    assert roots(text) == [
        f"1. {items[0]}[Fork]\n\n2. {items[1]}[Fork]\n\n3. {items[2]}[Fork]",
        "[Child] Details 1.", "[Child] Details 2.", "[Child] Details 3.",
    ]


def test_bold_title_alone_on_its_line_takes_the_lines_below():
    text = "1. **Plan**\n   Write it down.\n2. **Act**\n   Do it.\n3. **Check**\n   Look back."
    assert roots(text) == [
        "1. **Plan**[Fork]\n2. **Act**[Fork]\n3. **Check**[Fork]",
        "[Child]\n   Write it down.", "[Child]\n   Do it.", "[Child]\n   Look back.",
    ]


def test_bullet_list():
    text = "Pros:\n- Fast: very.\n- Cheap: quite.\n- Simple: always.\n"
    assert roots(text) == [
        "Pros:\n- Fast:[Fork]\n- Cheap:[Fork]\n- Simple:[Fork]\n",
        "[Child] very.", "[Child] quite.", "[Child] always.",
    ]


def test_nested_list_forks_again_inside_a_child():
    text = (
        "1. **Jazz**: Big.\n   - Louis: trumpet.\n   - Duke: piano.\n   - Bessie: voice.\n\n"
        "2. **Blues**: Old.\n\n3. **Swing**: Later."
    )
    assert roots(text) == [
        "1. **Jazz**:[Fork]\n\n2. **Blues**:[Fork]\n\n3. **Swing**:[Fork]",
        "[Child] Big.\n   - Louis:[Fork]\n   - Duke:[Fork]\n   - Bessie:[Fork]",
        "[Child] trumpet.", "[Child] piano.", "[Child] voice.",
        "[Child] Old.", "[Child] Later.",
    ]
    assert build_tree(text).depth == 2
    assert build_tree(text, TreeRules(max_depth=1)).depth == 1
    assert build_tree(text, TreeRules(max_depth=0)) == Node([text])


def test_item_details_go_on_over_blank_and_indented_lines_until_a_shallow_paragraph():
    text = "1. A: x\n\n   more x\n2. B: y\n- sub\n3. C: z\n\nAfter the list."
    assert roots(text) == [
        "1. A:[Fork]\n2. B:[Fork]\n3. C:[Fork]\n\nAfter the list.",
        "[Child] x\n\n   more x", "[Child] y\n- sub", "[Child] z",
    ]


def test_paragraphs_fork_after_their_first_sentence():
    text = (
        "Cats are calm. They sleep a lot.\n\n"
        "Dogs are loyal. They guard the house. They bark.\n\n"
        "Short one.\n\n"
        "Birds sing. Mostly at dawn."
    )
    assert roots(text) == [
        "Cats are calm.[Fork]\n\nDogs are loyal.[Fork]\n\nShort one.\n\nBirds sing.[Fork]",
        "[Child] They sleep a lot.", "[Child] They guard the house. They bark.", "[Child] Mostly at dawn.",
    ]


def test_two_multi_sentence_paragraphs_stay_linear():
    text = "Cats are calm. They sleep.\n\nDogs are loyal. They guard.\n\nThe end."
    assert build_tree(text) == Node([text])


@pytest.mark.parametrize(
    "text",
    [
        "Run this:\n\n1. Step: a\n2. Step: b\n3. Step: c\n\n```python\nprint(1)\n```",
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n1. A: x\n2. B: y\n3. C: z",
        "Solve $x^2 = \\frac{1}{2}$:\n1. A: x\n2. B: y\n3. C: z",
        "We get $$x = 1$$ so:\n1. A: x\n2. B: y\n3. C: z",
    ],
    ids=["code", "table", "inline-maths", "display-maths"],
)
def test_code_tables_and_maths_stay_linear(text):
    assert build_tree(text) == Node([text])


@pytest.mark.parametrize(
    "text",
    [
        "1. A: x\n2. B: y",  # two items only
        "1. A: x\n2. plain item\n3. C: z",  # an untitled item: no half list
        "1. A: x\n2. B:\n3. C: z",  # an item without details
        "1. A: x\n2. B: y\n\n1. C: z",  # numbering restarts: two lists of 2 and 1
        "1. A: x\n2. B: y\n## Part\n3. C: z",  # a heading ends the list
    ],
)
def test_lists_that_do_not_fork(text):
    assert build_tree(text).num_threads == 1


def test_a_list_of_multi_sentence_items_is_titled_by_first_sentences():
    text = "1. Preheat the oven. Use 180 C.\n2. Mix the flour. Add eggs.\n3. Bake it. Wait."
    assert roots(text)[0] == "1. Preheat the oven.[Fork]\n2. Mix the flour.[Fork]\n3. Bake it.[Fork]"
    assert build_tree(text, TreeRules(sentence_titles=False)).num_threads == 1


def test_first_sentence_skips_abbreviations_and_needs_a_capital():
    assert first_sentence_end("Use e.g. Salt. Then stir.") == len("Use e.g. Salt.")
    assert first_sentence_end("Dr. Who is here. Yes.") == len("Dr. Who is here.")
    assert first_sentence_end("Version 2.0 is out. Try it.") == len("Version 2.0 is out.")
    assert first_sentence_end("it ends here. and goes on") is None
    assert first_sentence_end("One sentence only.") is None


def test_crlf_text_restores_exactly():
    text = "1. A: x\r\n2. B: y\r\n3. C: z\r\n"
    tree = build_tree(text)
    assert tree.num_threads == 4
    assert restore(tree) == text


def test_empty_response_is_an_error():
    with pytest.raises(TreeError, match="empty"):
        build_tree(" \n ")


_PIECES = st.sampled_from([
    "1. ", "2. ", "3. ", "- ", "* ", "   ", "\t", "**Title**", "**T:**", ": ", ":", " - ", "Word",
    "word. ", "Next one. ", "e.g. ", "\n", "\n\n", "\r\n", "# H\n", "```", "|", "$", "é", "[x]",
])


_TITLES = st.sampled_from(["Word:", "**Title**:", "**T:**", "**Tip.**", "**Tip** -", "Next one. Word", "word"])
_DETAILS = st.sampled_from([" x.", " go to bed early.", " Word. Next one.", "", " e.g. ", "\n   more x",
                            "\n\n   more x", "\n\nWord", "\r\n", " ```", " $", " |", " [x]", " é", ":"])


def _render_list(marker: str, indent: str, items: list[tuple[str, str]]) -> str:
    lines = [f"{indent}{f'{i}.' if marker == '1.' else marker} {title}{details}"
             for i, (title, details) in enumerate(items, start=1)]
    return "\n" + "\n".join(lines) + "\n"


# A numbered or bullet list of 3 to 5 items: the rules fork it unless an item lacks a title or details,
# or a piece breaks it (a newline in the wrong place, a code fence, maths).
_LIST = st.tuples(st.sampled_from(["1.", "-", "*"]), st.sampled_from(["", "   "]),
                  st.lists(st.tuples(_TITLES, _DETAILS), min_size=3, max_size=5)).map(lambda t: _render_list(*t))
_RUN = st.lists(_PIECES, max_size=20).map("".join)
# pieces, then up to two lists each followed by more pieces
_TEXT = st.tuples(_RUN, st.lists(st.tuples(_LIST, _RUN).map("".join), max_size=2).map("".join)).map("".join)


def test_any_markdown_like_text_restores_exactly():
    """The round trip on generated text, and the generator reaches trees that fork: a `build_tree` that
    never forked would restore everything and must still fail here."""
    forked = []

    @settings(max_examples=300, deadline=None)
    @given(_TEXT)
    def round_trip(text):
        if not text.strip():
            return
        tree = build_tree(text)
        assert restore(tree) == text
        validate(tree)  # never an empty child, a fork first, or two forks in a row
        forked.append(tree.num_threads > 1)

    round_trip()
    assert sum(forked) >= 20, f"{sum(forked)} of {len(forked)} generated trees forked"

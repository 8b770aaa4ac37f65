"""Stitching the thread tree back into text: reading order, append-only deltas, no byte lost or doubled."""
import random

from apar.text.stitch import IncrementalDetokenizer, Stitcher, restore_tokens


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_reading_order_and_append_only_deltas(tokenizer):
    fork = tokenizer.convert_tokens_to_ids("[Fork]")
    child = tokenizer.convert_tokens_to_ids("[Child]")
    root = ids(tokenizer, "Tips:\n1. Sleep:") + [fork] + ids(tokenizer, "\n2. Eat:") + [fork] + ids(tokenizer, "\nDone.")
    c1 = ids(tokenizer, " at least eight hours.")
    c2 = ids(tokenizer, " vegetables, every day.")
    expected = "Tips:\n1. Sleep: at least eight hours.\n2. Eat: vegetables, every day.\nDone."
    f1, f2 = root.index(fork), len(root) - 1 - root[::-1].index(fork)
    # interleave: the root runs ahead, children fill in later (as parallel threads do)
    events = [("start", 0, None, -1)]
    events += [("tok", 0, t) for t in root[: f1 + 1]]
    events += [("start", 1, 0, f1)]
    events += [("tok", 0, t) for t in root[f1 + 1 : f2 + 1]]
    events += [("start", 2, 0, f2)]
    for a, b in zip(c1, c2):
        events += [("tok", 1, a), ("tok", 2, b)]
    events += [("tok", 1, t) for t in c1[len(c2):]] + [("tok", 2, t) for t in c2[len(c1):]]
    events += [("tok", 0, t) for t in root[f2 + 1 :]]
    events += [("fin", 2), ("fin", 0), ("fin", 1)]
    st = Stitcher(decoder(tokenizer), fork, child)
    streamed = ""
    for ev in events:
        if ev[0] == "start":
            st.start(ev[1], ev[2], ev[3])
        elif ev[0] == "tok":
            st.token(ev[1], ev[2])
        else:
            st.finish(ev[1], "stop")
        streamed += st.linear_delta()
        assert expected.startswith(streamed)  # every delta is final
    final = st.final_text()
    assert final == expected and st.done()
    # nothing of child 1 can be sent before it finishes, beyond its own produced tokens
    texts = {}
    for e in st.thread_events():
        if e.kind == "delta":
            texts[e.thread] = texts.get(e.thread, "") + e.text
    assert texts == {0: "Tips:\n1. Sleep:\n2. Eat:\nDone.", 1: " at least eight hours.", 2: " vegetables, every day."}
    threads = {0: (root, {f1: 1, f2: 2}), 1: (c1, {}), 2: (c2, {})}
    assert decoder(tokenizer)(restore_tokens(threads, fork)) == expected


def test_multibyte_character_split_across_a_fork(tokenizer):
    fork = tokenizer.convert_tokens_to_ids("[Fork]")
    child = tokenizer.convert_tokens_to_ids("[Child]")
    hi, lo = tokenizer.convert_tokens_to_ids("Ã"), tokenizer.convert_tokens_to_ids("©")  # the bytes of "é"
    st = Stitcher(decoder(tokenizer), fork, child)
    st.start(0, None, -1)
    for t in ids(tokenizer, "caf") + [hi, fork]:
        st.token(0, t)
    st.start(1, 0, 4)
    st.token(1, lo)
    out = st.linear_delta()
    assert "\ufffd" not in out
    st.finish(1, "stop")
    st.token(0, ids(tokenizer, "!")[0])
    st.finish(0, "stop")
    out += st.linear_delta()
    assert st.final_text() == "café!" and out == "café!"


def test_incremental_detokenizer_matches_full_decode(tokenizer):
    dec = decoder(tokenizer)
    text = "Ünïcödé text — with emoji 👋🏽 and CJK 中文字符, spaces  and\nnewlines."
    toks = ids(tokenizer, text)
    rng = random.Random(0)
    for _ in range(5):
        d = IncrementalDetokenizer(dec)
        out, i = "", 0
        while i < len(toks):
            n = rng.randint(1, 3)
            out += d.push(toks[i : i + n])
            assert "\ufffd" not in out
            i += n
        out += d.flush()
        assert out == text

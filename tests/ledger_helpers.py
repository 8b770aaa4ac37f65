"""What the ledger tests share: thread names, the random operation strategy, and the contents hash
computed by its formula."""
from __future__ import annotations

from hypothesis import strategies as st

from apar.engine.kv.ledger import ThreadRef


R = ThreadRef


# ---- property-based: random operation sequences keep every invariant ---------------------------------

ops = st.lists(
    st.tuples(st.sampled_from(["start", "append", "fork", "finish", "release", "advance", "append_each",
                                  "truncate"]),
              st.integers(0, 3), st.integers(0, 7), st.integers(1, 9)),
    max_size=60,
)

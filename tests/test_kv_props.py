"""Property tests for the paged KV block manager (posttrain_nb.serve.kv_cache).

A state machine drives random allocate / append / fork / free / preempt sequences against a simulated KV pool whose
"KV" of a slot is the whole prefix up to and including the token written there (real KV depends on every earlier
token, so a prefix-cache hit on a block computed after another prefix must be caught even when the block's own
tokens match). Token ids include values whose Python hashes collide (0 and 2**61-1, -1 and -2). After every step: no block is handed out twice, reference counts
equal the number of live block tables holding each block, free + used = total, and reading any live sequence
through its block table gives back exactly its tokens (so prefix hits returned blocks with identical contents and
copy-on-write never let one sequence's writes leak into another). At teardown everything is freed.
"""
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, invariant, initialize, precondition

from posttrain_nb.serve.kv_cache import BlockManager, KVSequence

COLLIDING = [0, 2**61 - 1, -1, -2]  # hash(0) == hash(2**61-1), hash(-1) == hash(-2)
TOKENS = st.sampled_from(COLLIDING + [1])  # a tiny vocabulary so that prefixes repeat and the cache gets hits


class PoolMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4]), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.kv = [[None] * block_size for _ in range(num_blocks)]  # simulated KV pool: token id per slot
        self.live = []

    def _write(self, seq, start):
        bs = self.bm.block_size
        for t in range(start, len(seq.token_ids)):
            self.kv[seq.block_table[t // bs]][t % bs] = tuple(seq.token_ids[:t + 1])  # KV depends on the whole prefix

    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=14))
    def allocate(self, tokens):
        s = KVSequence(list(tokens))
        if not self.bm.can_allocate(s):
            with pytest.raises(RuntimeError): self.bm.allocate(s)
            return
        free_before = set(self.bm.free_queue)
        hits = self.bm.prefix_hits(s)
        cached = self.bm.allocate(s)
        assert cached == len(hits) * self.bm.block_size and cached <= len(tokens) - 1
        assert s.block_table[:len(hits)] == hits
        fresh = s.block_table[len(hits):]
        assert set(fresh) <= free_before and len(set(fresh)) == len(fresh)  # fresh blocks came from the free queue
        self._write(s, cached)  # the engine computes KV only past the cached prefix
        self.live.append(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tok=TOKENS)
    def append(self, data, tok):
        s = data.draw(st.sampled_from(self.live))
        s.token_ids.append(tok)
        if not self.bm.can_append(s):
            s.token_ids.pop(); return
        copy = self.bm.append_slot(s)
        if copy is not None:
            src, dst = copy
            self.kv[dst] = list(self.kv[src])
        self._write(s, len(s.token_ids) - 1)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = KVSequence(list(parent.token_ids))
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        s = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.bm.free(s)
        assert s.block_table == [] and s.num_cached_tokens == 0

    @precondition(lambda self: self.live)
    @rule()
    def preempt_and_readmit(self):
        "Recompute-style preemption: free the newest sequence, then admit it again if it fits."
        s = self.live.pop()
        self.bm.free(s)
        if self.bm.can_allocate(s):
            self._write(s, self.bm.allocate(s)); self.live.append(s)

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"): return
        bm = self.bm
        bm.check(self.live)  # ref counts == table entries; free queue <=> ref 0; tables have ceil(len/bs) blocks
        used = {b for s in self.live for b in s.block_table}
        assert not used & set(bm.free_queue), "a block is free and in a table at once"
        assert len(used) + bm.num_free_blocks == bm.num_blocks
        # a block is handed out twice only by sharing: every holder of a block agrees on its contents
        for s in self.live:
            got = [bm_kv for t in range(len(s.token_ids)) for bm_kv in [self.kv[s.block_table[t // bm.block_size]][t % bm.block_size]]]
            want = [tuple(s.token_ids[:t + 1]) for t in range(len(s.token_ids))]
            assert got == want, "reading the sequence through its block table gives KV of another prefix"
        for s in self.live:
            assert bm.block_size * len(s.block_table) - len(s.token_ids) < bm.block_size  # waste < one block

    def teardown(self):
        if not hasattr(self, "bm"): return
        for s in self.live: self.bm.free(s)
        self.bm.check([])
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPool = PoolMachine.TestCase


def test_colliding_hashes_minimal_case():
    "Issue 13 item 9: with hash()-keyed chains, [0, 0, 0] reused the block written after 2**61-1."
    bm = BlockManager(8, 1)
    seqs = [KVSequence(t) for t in ([0], [2**61 - 1, 0], [0], [0, 0, 0])]
    for s in seqs: bm.allocate(s)
    assert seqs[3].num_cached_tokens == 1 and seqs[3].block_table[0] == seqs[2].block_table[0]
    assert seqs[3].block_table[1] not in seqs[1].block_table


@settings(max_examples=300, deadline=None)
@given(prompts=st.lists(st.lists(st.sampled_from(COLLIDING), min_size=1, max_size=6), min_size=2, max_size=6),
       bs=st.integers(1, 3))
def test_hits_hold_kv_of_the_same_prefix(prompts, bs):
    "Admit prompts one after another; every block a prompt reuses must hold KV computed for exactly its prefix."
    bm, kv = BlockManager(64, bs), {}  # block id -> the prefix (tuple) its KV was computed for
    for toks in prompts:
        s = KVSequence(list(toks))
        cached = bm.allocate(s)
        for i, bid in enumerate(s.block_table):
            prefix = tuple(toks[:min((i + 1) * bs, len(toks))])
            if i * bs < cached: assert kv[bid] == prefix, f"block {bid} holds KV of {kv[bid]}, reused for {prefix}"
            else: kv[bid] = prefix


@given(n=st.integers(1, 40), bs=st.integers(1, 8), extra=st.lists(TOKENS, max_size=10))
def test_same_prompt_hits_identical_blocks(n, bs, extra):
    "A second request with the same prompt (plus anything) reuses exactly the first one's full prompt blocks."
    bm = BlockManager(64, bs)
    prompt = [COLLIDING[i % 4] for i in range(n)]
    a = KVSequence(list(prompt)); bm.allocate(a)
    b = KVSequence(prompt + extra); got = bm.allocate(b)
    k = min((n // bs), (len(prompt + extra) - 1) // bs)  # full blocks of the shared prompt, capped at len-1
    assert got == k * bs
    assert b.block_table[:k] == a.block_table[:k]
    assert set(b.block_table[k:]).isdisjoint(a.block_table)
    bm.free(a); bm.free(b); bm.check([])


@given(n=st.integers(2, 30), bs=st.integers(1, 6))
def test_no_caching_never_shares(n, bs):
    bm = BlockManager(64, bs, enable_prefix_caching=False)
    a, b = KVSequence([1] * n), KVSequence([1] * n)
    bm.allocate(a); assert bm.allocate(b) == 0
    assert set(a.block_table).isdisjoint(b.block_table)

"""KVCacheManager: unit tests and a property test over random workloads."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from scheduler.kv_manager import KVCacheManager
from scheduler.request import Request, SamplingParams


def make_request(rid: str, prompt) -> Request:
    return Request(rid, list(prompt), SamplingParams())


def run(kv: KVCacheManager, request: Request, n: int, cached: int = 0) -> bool:
    """What the scheduler does for one step of n tokens (the runner's part is a no-op)."""
    if not kv.allocate_slots(request, n, cached):
        return False
    request.num_computed_tokens += cached + n
    kv.cache_full_blocks(request)
    kv.free_outside_window(request)
    return True


def test_allocate_counts_blocks_and_stats():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", range(9))
    assert kv.allocate_slots(a, 9)
    assert len(kv.block_table("a")) == 3 and kv.first_block_index("a") == 0
    assert (kv.num_used_blocks, kv.num_free_blocks, kv.usage) == (3, 5, 3 / 8)
    a.num_computed_tokens = 9
    assert kv.allocate_slots(a, 3)  # positions 9..11 fit in block 2
    assert len(kv.block_table("a")) == 3
    assert kv.allocate_slots(a, 4)  # 9..12 needs a 4th block
    assert len(kv.block_table("a")) == 4


def test_allocate_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", range(8)), make_request("b", range(100, 112))
    assert run(kv, a, 8)
    before = (kv.block_table("a"), kv.num_free_blocks)
    assert not kv.allocate_slots(b, 12)
    assert not kv.allocate_slots(a, 12)
    assert (kv.block_table("a"), kv.num_free_blocks) == before
    assert kv.block_table("b") == ()


def test_window_frees_blocks_out_of_sight():
    kv = KVCacheManager(num_blocks=6, block_size=4, sliding_window=8)
    a = make_request("a", range(40))
    for _ in range(40):
        assert run(kv, a, 1)
        c = a.num_computed_tokens
        # Query c sees keys c-7..c; the first live block must hold c-7, the one before not.
        assert kv.first_block_index("a") == max(0, (c - 7) // 4)
        assert len(kv.block_table("a")) <= math.ceil(8 / 4) + 1
    assert kv.num_used_blocks == len(kv.block_table("a"))


def test_window_freeing_makes_room_for_the_next_chunk():
    kv = KVCacheManager(num_blocks=5, block_size=4, sliding_window=4)
    a = make_request("a", range(40))
    a.num_computed_tokens = 0
    assert kv.allocate_slots(a, 16)  # one big chunk: 4 blocks, then stepping on with the window
    a.num_computed_tokens = 16
    # Query 16 sees 13..16: blocks 0..2 are gone; without freeing them 8 blocks would be needed.
    assert kv.allocate_slots(a, 16)
    assert kv.first_block_index("a") == 3 and len(kv.block_table("a")) == 5


def test_shared_blocks_leaving_the_window_free_no_room():
    kv = KVCacheManager(num_blocks=4, block_size=2, sliding_window=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)  # no free_outside_window: allocate_slots must do it
    b = make_request("b", [1, 2, 3, 4, 9])
    assert kv.get_computed_blocks(b) == 4 and kv.allocate_slots(b, 1, 4)
    assert kv.block_table("b")[0] == kv.block_table("a")[1] and kv.num_free_blocks == 0
    # Positions 5..8 need 2 more blocks; leaving the window frees a's block 0 but not the
    # block b shares.
    before = (kv.block_table("a"), kv.first_block_index("a"))
    assert not kv.allocate_slots(a, 4)
    assert (kv.block_table("a"), kv.first_block_index("a"), kv.num_free_blocks) == before + (0,)
    assert kv.allocate_slots(a, 2)
    assert kv.first_block_index("a") == 2 and kv.num_free_blocks == 0


def test_prefix_hit_shares_blocks_with_refcount():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(10))
    a = make_request("a", prompt)
    assert kv.get_computed_blocks(a) == 0
    assert run(kv, a, 10)
    b = make_request("b", prompt + [50, 51])
    assert kv.get_computed_blocks(b) == 8
    assert run(kv, b, 4, cached=8)
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.num_used_blocks == 3 + 1
    kv.free(a)
    assert kv.num_used_blocks == 3  # the shared blocks stay with b
    kv.free(b)
    kv.free(b)  # idempotent
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 10
    c = make_request("c", prompt + [50, 51, 52])  # cached-free blocks still hit
    assert kv.get_computed_blocks(c) == 12
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 12, 8)


def test_never_the_whole_prompt():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert run(kv, make_request("a", range(8)), 8)
    assert kv.get_computed_blocks(make_request("b", range(8))) == 4
    assert kv.get_computed_blocks(make_request("c", range(9))) == 8


def test_hash_chain_depends_on_the_whole_prefix():
    kv = KVCacheManager(num_blocks=10, block_size=2)
    assert run(kv, make_request("a", [1, 2, 3, 4, 5]), 5)
    assert kv.get_computed_blocks(make_request("b", [9, 9, 3, 4, 5])) == 0
    assert kv.get_computed_blocks(make_request("c", [1, 2, 9, 4, 5])) == 2


def test_eviction_is_lru_tail_first_and_forgets_the_hash():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    assert run(kv, a, 7)
    kv.free(a)
    assert kv.num_free_blocks == 4
    assert kv.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5, 6, 7])) == 6
    b = make_request("b", [9, 9, 9])  # 2 fresh blocks: the unhashed one, then a's last hashed
    assert run(kv, b, 3)
    assert kv.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5, 6, 7])) == 4


def test_disabled_prefix_caching():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    assert run(kv, make_request("a", [1, 2, 3, 4, 5]), 5)
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == 0
    assert kv.prefix_cache_queries == 0


def test_max_num_tokens():
    assert KVCacheManager(8, 4).max_num_tokens(4) == 32
    assert KVCacheManager(8, 4, sliding_window=8).max_num_tokens(4) is None
    assert KVCacheManager(8, 4, sliding_window=8).max_num_tokens(64) == 32  # chunk too big


# -- property test ---------------------------------------------------------------------------

class Workload:
    """Drives a KVCacheManager like the scheduler does and checks it against a model.

    content[b] is what the KV in block b was computed from: the token prefix up to the end
    of that block (None while partly written). A prefix hit must return blocks whose content
    is exactly the prompt's prefix.
    """

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.bs = kv.block_size
        self.live: dict[str, Request] = {}
        self.preempted: dict[str, Request] = {}
        self.content: dict[int, tuple | None] = {}

    def expected_hits(self, tokens: list[int]) -> int:
        if not self.kv.enable_prefix_caching:
            return 0
        cached = {self.content[b.block_id] for b in self.kv._blocks if b.block_hash is not None}
        k = 0
        while k < (len(tokens) - 1) // self.bs and tuple(tokens[:(k + 1) * self.bs]) in cached:
            k += 1
        return k * self.bs

    def start(self, request: Request, chunk: int, next_token: int) -> None:
        tokens = request.all_token_ids
        hits = self.kv.get_computed_blocks(request)
        assert hits == self.expected_hits(tokens)
        n = min(len(tokens) - hits, chunk)
        if not self.kv.allocate_slots(request, n, hits):
            assert self.kv.block_table(request.request_id) == ()
            self.preempted[request.request_id] = request
            return
        first = self.kv.first_block_index(request.request_id)
        for i, b in enumerate(self.kv.block_table(request.request_id)):
            if first + i < hits // self.bs:  # a hit: the same physical block, right content
                assert self.content[b] == tuple(tokens[:(first + i + 1) * self.bs])
        request.num_computed_tokens = hits
        self.live[request.request_id] = request
        self.compute(request, n, next_token)

    def advance(self, request: Request, chunk: int, next_token: int) -> None:
        n = min(request.num_tokens - request.num_computed_tokens, chunk)
        rid = request.request_id
        before = (self.kv.block_table(rid), self.kv.first_block_index(rid), self.kv.num_free_blocks)
        if self.kv.allocate_slots(request, n):
            self.compute(request, n, next_token)
        else:  # preempted, as the scheduler would
            assert before == (self.kv.block_table(rid), self.kv.first_block_index(rid),
                              self.kv.num_free_blocks)
            self.kv.free(request)
            request.num_computed_tokens = 0
            del self.live[rid]
            self.preempted[rid] = request

    def compute(self, request: Request, n: int, next_token: int) -> None:
        """The runner writes KV for n tokens; then the scheduler's update."""
        start, end = request.num_computed_tokens, request.num_computed_tokens + n
        table = self.kv.block_table(request.request_id)
        first = self.kv.first_block_index(request.request_id)
        assert first + len(table) == math.ceil(end / self.bs)
        tokens = request.all_token_ids
        for k in range(start // self.bs, math.ceil(end / self.bs)):
            block = self.kv._blocks[table[k - first]]
            assert block.ref_cnt == 1 and block.block_hash is None  # never write a shared block
            self.content[block.block_id] = (tuple(tokens[:(k + 1) * self.bs])
                                            if (k + 1) * self.bs <= end else None)
        request.num_computed_tokens = end
        if end == request.num_tokens:
            request.output_token_ids.append(next_token)
        self.kv.cache_full_blocks(request)
        self.kv.free_outside_window(request)

    def finish(self, request: Request) -> None:
        self.kv.free(request)
        self.live.pop(request.request_id, None)
        self.preempted.pop(request.request_id, None)

    def check(self) -> None:
        kv, holders = self.kv, {}
        for rid, request in self.live.items():
            table, first = kv.block_table(rid), kv.first_block_index(rid)
            assert len(set(table)) == len(table)
            if kv.sliding_window is not None:
                assert len(table) <= math.ceil(kv.sliding_window / self.bs) + 1
                c = request.num_computed_tokens
                assert first == max(0, (c - kv.sliding_window + 1) // self.bs)
            for i, b in enumerate(table):
                holders.setdefault(b, []).append((request, first + i))
        for block in kv._blocks:
            owners = holders.get(block.block_id, [])
            assert block.ref_cnt == len(owners)
            if len(owners) > 1:  # shared only through the prefix cache, same prefix
                assert block.block_hash is not None
                for request, k in owners:
                    prefix = tuple(request.all_token_ids[:(k + 1) * self.bs])
                    assert self.content[block.block_id] == prefix
        assert kv.num_free_blocks == kv.num_blocks - len(holders)
        hashed = [self.content[b.block_id] for b in kv._blocks if b.block_hash is not None]
        assert None not in hashed and len(set(hashed)) == len(hashed)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_blocks=st.integers(3, 20), block_size=st.sampled_from([1, 2, 4]),
       window=st.sampled_from([None, 3, 4, 8]), caching=st.booleans(),
       bases=st.lists(st.lists(st.integers(0, 3), min_size=12, max_size=12), min_size=2,
                      max_size=2))
def test_random_workload(data, num_blocks, block_size, window, caching, bases):
    kv = KVCacheManager(num_blocks, block_size, window, caching)
    w = Workload(kv)
    tokens = st.integers(0, 3)
    for step in range(data.draw(st.integers(1, 60))):
        op = data.draw(st.sampled_from(["start", "start", "advance", "advance", "advance",
                                        "resume", "abort", "finish"]))
        chunk = data.draw(st.integers(1, 8))
        if op == "start":
            base = data.draw(st.sampled_from(bases))
            prompt = base[:data.draw(st.integers(0, 12))] + data.draw(
                st.lists(tokens, min_size=0, max_size=6))
            w.start(make_request(f"r{step}", prompt or [0]), chunk, data.draw(tokens))
        elif op == "resume" and w.preempted:
            request = w.preempted.pop(data.draw(st.sampled_from(sorted(w.preempted))))
            w.start(request, chunk, data.draw(tokens))
        elif w.live:
            request = w.live[data.draw(st.sampled_from(sorted(w.live)))]
            if op == "advance" and request.num_tokens < 40:
                w.advance(request, chunk, data.draw(tokens))
            elif op != "advance":
                w.finish(request)
        w.check()
    for request in list(w.live.values()) + list(w.preempted.values()):
        w.finish(request)
    w.check()
    assert kv.num_free_blocks == num_blocks and kv.num_used_blocks == 0
    assert all(b.ref_cnt == 0 for b in kv._blocks)

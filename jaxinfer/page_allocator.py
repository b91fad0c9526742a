"""The KV-cache page allocator and prefix cache: reference counts, a free list and an LRU of cached pages,
plain Python (no jax).

Every page is in exactly one of three states:
  referenced   ref count > 0: in some running sequence's page table (several, when shared);
  cached       ref count 0, holds the K/V of a full page known by its hash: kept for reuse by a later
               prompt with the same prefix, evicted least-recently-freed first when pages are needed;
  free         ref count 0, content unknown (the free list).
`num_free` counts what `allocate` can hand out: free plus cached pages.

A full page is named by a hash chained over its parent page's hash, its token ids and an `extra` key for
anything else that changes K/V (a LoRA adapter, later), so equal hashes mean equal K/V for the whole prefix.
Pages are registered with `cache_page` only once their K/V have been computed; nobody writes into a
registered page again, so sharing it is safe. Reference counts also let n > 1 children share pages.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfPages(Exception):
    pass


def page_hash(parent: bytes | None, token_ids: Sequence[int], extra: object = None) -> bytes:
    """The hash of one full page: sha256 over the parent page's hash, the page's tokens and `extra`.

    sha256 rather than Python's hash: a collision would silently hand one prompt another prompt's K/V.
    """
    h = hashlib.sha256(parent or b"")
    h.update(b",".join(str(int(t)).encode() for t in token_ids))
    if extra is not None:
        h.update(b"|" + repr(extra).encode())
    return h.digest()


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._cached: dict[bytes, int] = {}  # hash -> page
        self._hash_of: dict[int, bytes] = {}  # page -> hash, for every cached page (referenced or not)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages with ref count 0, LRU first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: never-cached free pages plus unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages referenced by some sequence."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a registered prefix (referenced or not)."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """n pages with ref count 1, free ones first, then evicting the least recently used cached ones.

        Raises OutOfPages (allocating and evicting nothing) if fewer than n are available.
        """
        if n > self.num_free:
            raise OutOfPages(f"{n} pages wanted, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.popleft()
            else:
                p, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(p)]
                self.num_evictions += 1
            self.ref_counts[p] = 1
            pages.append(p)
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each page; an unreferenced cached page is taken off the eviction list."""
        for p in pages:
            if self.ref_counts[p] == 0:
                if p not in self._evictable:
                    raise ValueError(f"page {p} is not allocated and cannot be shared")
                del self._evictable[p]
            self.ref_counts[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page. Unreferenced cached pages stay cached (evictable), the others
        go back to the free list. Freed back to front, so a sequence's tail is evicted before its head
        (a page is useless without its parents)."""
        for p in reversed(pages):
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} freed more often than allocated")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                if p in self._hash_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    # -- the prefix cache -------------------------------------------------------------------------------

    def cache_page(self, page: int, h: bytes) -> bool:
        """Register a referenced, full, computed page under hash h. False (nothing changes) if the page is
        already registered or another page already holds h (the same prefix computed twice)."""
        if self.ref_counts[page] <= 0:
            raise ValueError(f"page {page} is not allocated and cannot be cached")
        if page in self._hash_of or h in self._cached:
            return False
        self._cached[h] = page
        self._hash_of[page] = h
        return True

    def clear_cache(self) -> None:
        """Forget every registered prefix: unreferenced cached pages become free, referenced ones stay with
        their sequences but are no longer found by `lookup` (benchmarks: a cold cache without a new engine)."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()

    def is_cached(self, page: int) -> bool:
        return page in self._hash_of

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages of the longest cached prefix of `hashes` (references are not taken: see `share`)."""
        pages = []
        for h in hashes:
            p = self._cached.get(h)
            if p is None:
                break
            pages.append(p)
        return pages

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not free & set(self._evictable), "a page is both free and evictable"
        assert len(self._cached) == len(self._hash_of), "hash map and page map differ in size"
        for h, p in self._cached.items():
            assert self._hash_of.get(p) == h, f"page {p}: hash maps disagree"
        for p, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"page {p} has ref count {rc}"
            assert (p in free) == (rc == 0 and p not in self._hash_of), f"page {p}: ref count {rc}, free list wrong"
            assert (p in self._evictable) == (rc == 0 and p in self._hash_of), f"page {p}: ref count {rc}, LRU wrong"

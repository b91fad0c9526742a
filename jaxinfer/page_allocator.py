"""The KV-cache page allocator: a free list and reference counts, plain Python (no jax).

Reference counts are there so a page can be shared by several sequences (prefix caching, n > 1).
"""

from __future__ import annotations

from collections import deque


class OutOfPages(Exception):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with ref count 1; raises OutOfPages (allocating nothing) if fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"{n} pages wanted, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self.ref_counts[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} is not allocated and cannot be shared")
            self.ref_counts[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} freed more often than allocated")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self._free.append(p)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        for p, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"page {p} has ref count {rc}"
            assert (rc == 0) == (p in free), f"page {p}: ref count {rc} but {'in' if p in free else 'not in'} free list"

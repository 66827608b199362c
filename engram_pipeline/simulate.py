"""Exact hit-rate simulation of cache policies over a prefetch trace, at equal capacities.

Model (the store's): a request is one prefetch of one table, deduped; each of its unique
rows is a *hit* if the cache holds it when the request arrives, else a *miss* (read from
disk). After the request the policy chooses what to hold, out of what it held plus the
request's rows, at most ``capacity`` rows per table. Hit rates are over unique-per-request
accesses, which is what ``store.stats()`` counts.

Policies (all simulated exactly, vectorized per request):

- ``ours``: the store. HBM holds the ``H`` highest-ranked rows (static, from training
  counts); DRAM is :class:`~engram_store.resident.policy.SlotPolicy` with ``C = capacity - H``
  slots, warmed with ranks ``[H, H+C)``, every access pinning its slots until the handle is
  released, handles released in issue order with at most ``window`` outstanding. It runs
  the very class the store runs, keyed by row id with the ranks as its order (as the store's
  DRAM tier is), so it predicts the store's counts exactly. With ``lookahead=L`` the caller
  hints (``SlotPolicy.hint``) the DRAM ids of each table's next ``L`` requests before each
  access, as a data loader that has the next batches ready would (``store.hint``). A request
  whose ids are all in HBM never reaches the DRAM policy (the store's hit path serves it
  without a tick of the policy's clock), so it is neither hinted nor accessed.
- ``optimum``: the bound for a store that starts warm: MIN with a free initial fill (at time
  zero hold the ``capacity`` rows first used soonest, then keep the rows whose next use is
  soonest). No policy that holds at most ``capacity`` rows, however it starts, beats it.
- ``fill_optimum``: MIN whose initial fill is the store's own warm fill (the ``capacity``
  top-ranked rows by training counts, which ``ours`` starts with), then keep the rows whose
  next use is soonest. The bound for a policy that starts where the store starts: where the
  capacity exceeds every row a trace touches, ``optimum`` is 100% by its free fill, while this
  one still pays for the rows training never ranked within the capacity.
- ``lru``: keep the ``capacity`` most recently used rows (ties within a request: higher
  row id kept). ``fifo``: keep the most recently *inserted*. ``lfu``: keep the rows with
  the most accesses so far in the trace (not reset on eviction; ties: more recent, then
  higher id), so a miss is admitted only if it beats the least frequent cached row.
- ``static``: the ``capacity`` highest-ranked rows by training counts, never changing.
- ``belady``: MIN from an empty cache: keep the rows whose next use is soonest (rows never
  used again are dropped); the optimum for a cache that starts cold. Greedy farthest-next-use is optimal here too: a request is a
  set needed at one time, and a miss need not be cached.
- ``compulsory``: not a policy but the bound ``accesses - first touches`` (infinite cache).

All start cold except ``ours`` (which starts warm, like the store), ``static``, ``optimum`` and ``fill_optimum``.
Peers from libcachesim (``engram_pipeline.peers``) run on the same requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engram_store.resident.policy import SlotPolicy
from engram_store.errors import EngramStoreError
from engram_pipeline.traces import Trace

POLICIES = ("ours", "optimum", "fill_optimum", "belady", "lru", "lfu", "fifo", "static")
DEFAULT_FRACTIONS = (0.001, 0.01, 0.1, 0.25, 0.5)
_INF = np.iinfo(np.int64).max


@dataclass
class Result:
    policy: str
    fraction: float | None  # capacity as a fraction of each table's rows (None: given in rows)
    capacity: dict[str, int]  # rows cached per table (HBM + DRAM for ``ours``)
    hits: int
    accesses: int
    tiers: dict[str, int] = field(default_factory=dict)  # ``ours``: hbm / dram hits, split
    per_table: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> (hits, accesses)
    lookahead: int = 0  # ``ours``: hinted requests ahead

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def to_dict(self) -> dict:
        return {"policy": self.policy, "fraction": self.fraction, "capacity": self.capacity, "hits": self.hits,
                "accesses": self.accesses, "hit_rate": round(self.hit_rate, 6), "lookahead": self.lookahead,
                **({"tiers": self.tiers} if self.tiers else {})}


def capacity_rows(trace: Trace, capacity: float | Mapping[str, int]) -> dict[str, int]:
    """Rows per table: a fraction of each table (0 < f <= 1) or ``{table: rows}``."""
    if isinstance(capacity, Mapping):
        caps = {}
        for table, rows in trace.rows.items():
            if table not in capacity:
                raise EngramStoreError(f"no capacity given for table {table!r}")
            c = int(capacity[table])
            if c < 0 or c > rows:
                raise EngramStoreError(f"capacity {c} rows for {table!r} is outside [0, {rows}] "
                                       "(the table's rows): give at most the table size")
            caps[table] = c
        return caps
    f = float(capacity)
    if not 0.0 <= f <= 1.0:
        raise EngramStoreError(f"capacity {f:g} is not a fraction of the table in [0, 1]: a cache larger than "
                               "the table holds nothing more (give e.g. 0.1 for 10% of the rows)")
    return {t: int(round(f * rows)) for t, rows in trace.rows.items()}


def compulsory(trace: Trace) -> Result:
    """Hits of an infinite cache that starts empty: every access but the first touch of each row."""
    hits = acc = 0
    per = {}
    for table in trace.rows:
        reqs = trace.table_requests(table)
        n = int(sum(r.size for r in reqs))
        seen = np.zeros(trace.n_ids(table), dtype=bool)
        for r in reqs:
            seen[r] = True
        h = n - int(np.count_nonzero(seen))
        per[table] = (h, n)
        hits += h
        acc += n
    return Result("compulsory", 1.0, dict(trace.rows), hits, acc, per_table=per)


# -- per-table policies (keep the top ``cap`` rows by a priority) ---------------------------

def _next_use(reqs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """For each request's rows, the index of the next request that names the row (or _INF); and
    every distinct row with the index of its first request."""
    sizes = np.fromiter((r.size for r in reqs), dtype=np.int64, count=len(reqs))
    flat = np.concatenate(reqs) if reqs else np.empty(0, np.int64)
    ridx = np.repeat(np.arange(len(reqs), dtype=np.int64), sizes)
    order = np.lexsort((ridx, flat))
    nxt = np.full(flat.size, _INF, dtype=np.int64)
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = ridx[order[1:][same]]
    first = order[np.concatenate([[True], ~same])] if flat.size else order
    return np.split(nxt, np.cumsum(sizes)[:-1]), flat[first], ridx[first]


def _min_priority(nu: np.ndarray, ids: np.ndarray, rows: int) -> np.ndarray:
    """MIN's keep-priority (larger is kept): next use soonest first, then higher id; -_INF: never used again."""
    return np.where(nu == _INF, -_INF, -(nu * rows + (rows - 1 - ids)))


def _simulate_table(policy: str, reqs: Sequence[np.ndarray], rows: int, cap: int,
                    rank: np.ndarray | None) -> int:
    if cap <= 0 or not reqs:
        return 0
    if policy == "static":
        return int(sum(np.count_nonzero(rank[r] < cap) for r in reqs))
    n_req = len(reqs)
    # Priorities are int64 composites (…, row id): larger is kept. Check they cannot overflow.
    if policy == "lfu" and (n_req + 1) ** 2 * rows >= 2**62:
        raise EngramStoreError("trace too long for the LFU simulation's priority keys; split it")
    nxt = None
    held = np.zeros(rows, dtype=bool)
    prio = np.zeros(rows, dtype=np.int64)
    freq = np.zeros(rows, dtype=np.int64) if policy == "lfu" else None
    cached = np.empty(0, dtype=np.int64)
    if policy in ("belady", "optimum", "fill_optimum"):
        nxt, first_row, first_req = _next_use(reqs)
        p0 = _min_priority(first_req, first_row, rows)
        if policy == "optimum":  # the free initial fill: the rows first used soonest
            cached = first_row[np.argsort(-p0, kind="stable")[:cap]]
        elif policy == "fill_optimum":  # the store's warm fill: the top-ranked rows
            cached = np.flatnonzero(rank < cap)
        held[cached] = True
        prio[cached] = -_INF  # a fill row the trace never names goes at the first request
        prio[first_row] = p0
    hits = 0
    for i, ids in enumerate(reqs):
        h = held[ids]
        hits += int(np.count_nonzero(h))
        new = ids[~h]
        if policy == "lru":
            prio[ids] = i * rows + ids
        elif policy == "fifo":
            prio[new] = i * rows + new
        elif policy == "lfu":
            freq[ids] += 1
            prio[ids] = (freq[ids] * (n_req + 1) + i) * rows + ids
        elif policy in ("belady", "optimum", "fill_optimum"):
            prio[ids] = _min_priority(nxt[i], ids, rows)
        else:
            raise EngramStoreError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        cand = np.concatenate([cached, new])
        if nxt is not None:  # rows never used again are dropped
            cand = cand[prio[cand] != -_INF]
        if cand.size > cap:
            part = np.argpartition(prio[cand], cand.size - cap)
            keep = cand[part[cand.size - cap :]]
        else:
            keep = cand
        held[cached] = False
        held[keep] = True
        cached = keep
    return hits


# -- ours: the store's own policy objects ----------------------------------------------------

def _simulate_ours(trace: Trace, caps: dict[str, int], ranks: dict[str, np.ndarray], hbm_share: float,
                   window: int, lookahead: int, policy_kwargs: dict):
    hbm = {t: int(round(hbm_share * c)) for t, c in caps.items()}
    policies, dram_keys = {}, {}
    for t, c in caps.items():
        rank = ranks[t]
        pol = SlotPolicy(trace.n_ids(t), c - hbm[t], order=rank, **policy_kwargs)
        warm = np.flatnonzero((rank >= hbm[t]) & (rank < c))
        pol.warm(warm[np.argsort(rank[warm], kind="stable")])
        policies[t] = pol
        # the DRAM part of each of the table's requests that has one (what the store passes to the policy)
        dram_keys[t] = [k for k in (ids[rank[ids] >= hbm[t]] for tt, ids in trace.requests if tt == t) if k.size]
    hbm_hits = dict.fromkeys(caps, 0)
    made = dict.fromkeys(caps, 0)  # DRAM requests made so far, per table
    announced = dict.fromkeys(caps, 0)  # ... and hinted so far
    outstanding: deque = deque()
    for table, ids in trace.requests:
        if len(outstanding) >= window:
            t, token = outstanding.popleft()
            policies[t].release(token)
        in_hbm = ranks[table][ids] < hbm[table]
        hbm_hits[table] += int(np.count_nonzero(in_hbm))
        if in_hbm.all():  # served by the store's all-resident pass without reaching the policy
            continue
        pol, todo, j = policies[table], dram_keys[table], made[table]
        if lookahead:  # this request and the next ``lookahead`` are announced before it is made
            while announced[table] < min(j + 1 + lookahead, len(todo)):
                pol.hint(todo[announced[table]])
                announced[table] += 1
        slots, _, _ = pol.access(todo[j])
        made[table] = j + 1
        outstanding.append((table, pol.hold(slots)))
    while outstanding:
        t, token = outstanding.popleft()
        policies[t].release(token)
    return hbm, hbm_hits, {t: pol.hits for t, pol in policies.items()}


def simulate(trace: Trace, policy: str, capacity: float | Mapping[str, int], *, hbm_share: float = 0.25,
             window: int = 2, lookahead: int = 0, policy_kwargs: dict | None = None) -> Result:
    """Hits of ``policy`` over ``trace`` with ``capacity`` rows per table (fraction or ``{table: rows}``).

    ``ours`` splits each table's capacity into ``round(hbm_share * capacity)`` HBM rows and the
    rest DRAM slots; ``window`` is the number of outstanding handles (>= 1); ``lookahead`` the
    requests of each table hinted ahead (0: no hints); ``policy_kwargs`` go to :class:`SlotPolicy`.
    """
    if policy not in POLICIES:
        raise EngramStoreError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    fraction = None if isinstance(capacity, Mapping) else float(capacity)
    caps = capacity_rows(trace, capacity)
    if window < 1:
        raise EngramStoreError(f"window must be >= 1 outstanding handle, got {window}")
    if lookahead < 0:
        raise EngramStoreError(f"lookahead must be >= 0 requests hinted ahead (0: no hints), got {lookahead}")
    if not 0.0 <= hbm_share <= 1.0:
        raise EngramStoreError(f"hbm_share must be in [0, 1], got {hbm_share}")
    ranks = None
    if policy in ("ours", "static", "fill_optimum"):
        if trace.counts is None and trace.ranks is None:
            raise EngramStoreError(f"policy {policy!r} ranks rows by training counts, but trace {trace.name!r} has "
                                   "none: give a counts file made with the trace's checkpoint")
        ranks = {t: trace.rank(t) for t in trace.rows}
    per = {}
    tiers = {}
    if policy == "ours":
        hbm, hbm_hits, dram_hits = _simulate_ours(trace, caps, ranks, hbm_share, window, lookahead, policy_kwargs or {})
        for t in trace.rows:
            n = int(sum(r.size for r in trace.table_requests(t)))
            per[t] = (hbm_hits[t] + dram_hits[t], n)
        tiers = {"hbm": sum(hbm_hits.values()), "dram": sum(dram_hits.values()),
                 "hbm_rows": sum(hbm.values()), "dram_rows": sum(caps.values()) - sum(hbm.values())}
    else:
        for t in trace.rows:
            reqs = trace.table_requests(t)
            h = _simulate_table(policy, reqs, trace.n_ids(t), caps[t], None if ranks is None else ranks[t])
            per[t] = (h, int(sum(r.size for r in reqs)))
    hits = sum(h for h, _ in per.values())
    acc = sum(n for _, n in per.values())
    return Result(policy, fraction, caps, hits, acc, tiers, per, lookahead if policy == "ours" else 0)


def sweep(trace: Trace, fractions: Iterable[float] = DEFAULT_FRACTIONS, policies: Sequence[str] = POLICIES,
          **kwargs) -> list[Result]:
    """Every policy at every capacity fraction, plus the compulsory bound (once, capacity-free)."""
    out = []
    for f in fractions:
        for p in policies:
            out.append(simulate(trace, p, f, **kwargs))
    out.append(compulsory(trace))
    return out

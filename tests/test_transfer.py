"""Max-min fair sharing of endpoint bandwidth (DESIGN contract §8), checked by hand and against references."""

from __future__ import annotations

import math
import random

from hetero_sched.core.transfer import TransferNetwork, max_min_rates


def test_max_min_rates_hand_case():
    # endpoints: 0, 1 send; 2, 3 receive.  egress 0 = 10, egress 1 = 10, ingress 2 = 10, ingress 3 = 100
    # flows a: 0->2, b: 1->2, c: 0->3.  Ingress 2 is shared by a, b -> 5 each;
    # c then takes what egress 0 has left: 10 - 5 = 5.
    rates = max_min_rates([(0, 2), (1, 2), (0, 3)], [10, 10, 0, 0], [0, 0, 10, 100])
    assert rates == [5.0, 5.0, 5.0]


def test_max_min_rates_unequal_bottlenecks():
    # egress 0 = 12 shared by three flows to 1, 2, 3; ingress 1 = 2 caps the first.
    # Level rises to 2 (ingress 1 saturates), then the other two split the remaining 10 -> 5 each.
    rates = max_min_rates([(0, 1), (0, 2), (0, 3)], [12, 0, 0, 0], [0, 2, 100, 100])
    assert rates == [2.0, 5.0, 5.0]


def test_network_finish_times_recomputed_on_start_and_end():
    net = TransferNetwork([100.0, 0, 0], [0, 100.0, 100.0])
    net.start(0.0, 1, 0, 1, 100.0)                 # alone: 100 B/s -> would end at 1.0
    assert math.isclose(net.next_finish_s(), 1.0)
    net.start(0.5, 2, 0, 2, 100.0)                 # 50 B left on #1; now both share egress 0 at 50 B/s
    assert math.isclose(net.next_finish_s(), 1.5)  # #1: 50 B at 50 B/s
    assert net.finish_due(1.5) == [1]
    # #2 moved 50 B in [0.5, 1.5]; alone again at 100 B/s -> 0.5 s more
    assert math.isclose(net.next_finish_s(), 2.0)
    assert net.finish_due(2.0) == [2]
    assert net.next_finish_s() is None


def test_stale_versions_change_when_rates_change():
    net = TransferNetwork([10.0, 0], [0, 10.0])
    v0 = net.version
    net.start(0.0, 7, 0, 1, 10.0)
    assert net.version != v0


def test_flows_of_one_pair_share_equally_with_other_pairs():
    # three flows 0->2 and one flow 1->2 into ingress 2 = 8; egress 1 = 1 caps the lone flow,
    # the three others split the remaining 7
    rates = max_min_rates([(0, 2), (1, 2)], [100, 1, 0], [0, 0, 8], counts=[3, 1])
    assert math.isclose(rates[0], 7 / 3) and rates[1] == 1.0
    net = TransferNetwork([100.0, 1.0, 0.0], [0.0, 0.0, 8.0])
    for tid in range(3):
        net.start(0.0, tid, 0, 2, 7.0)          # 7 B each at 7/3 B/s -> all done at 3.0
    net.start(0.0, 9, 1, 2, 100.0)
    assert math.isclose(net.next_finish_s(), 3.0)
    assert net.finish_due(3.0) == [0, 1, 2]
    # the lone flow moved 3 B; now it is still capped by its egress of 1 B/s -> 97 s more
    assert math.isclose(net.next_finish_s(), 100.0)


def test_cancel_keeps_transfers_it_finds_finished():
    # A late clock cancels at 1.5 (an endpoint failed) before the event at 1.0 that would have
    # handed out #1: cancel's advance finds #1 finished and must carry it to the next advance.
    # (Before the fix it extended the list _advance had just replaced, so #1 vanished: the
    # core kept it in flight forever, its KV never arriving.)
    net = TransferNetwork([100.0, 100.0, 0, 0], [0, 0, 100.0, 100.0])
    net.start(0.0, 1, 0, 2, 100.0)                 # alone on its path: ends at 1.0
    net.start(0.0, 2, 1, 3, 1000.0)                # these two share 1->3: end at 20.0
    net.start(0.0, 3, 1, 3, 1000.0)
    net.cancel(1.5, 2)
    net.cancel(1.5, 3)                             # a second cancel keeps the carry too
    assert net.next_finish_s() == 1.5              # due at once
    assert net.finish_due(1.5) == [1]
    assert net.next_finish_s() is None


def _check_against_a_global_recompute(net: TransferNetwork, egress, ingress) -> None:
    rates = net.rates()
    counts = net.counts()
    flows = sorted(rates)
    expected = max_min_rates(flows, egress, ingress, [counts[f] for f in flows])
    for f, want in zip(flows, expected):
        assert math.isclose(rates[f], want, rel_tol=1e-7), (f, rates[f], want)


def _random_endpoints(rng: random.Random, n: int) -> tuple[list[float], list[float]]:
    """Egress and ingress bandwidths of ``n`` endpoints: a few shared values (ties), the rest random."""
    egress = [rng.choice([100.0, 400.0, 50.0 + rng.random() * 500]) for _ in range(n)]
    ingress = [rng.choice([600.0, 200.0, 30.0 + rng.random() * 700]) for _ in range(n)]
    return egress, ingress


def test_local_rerating_equals_max_min_over_the_whole_network_on_random_traffic():
    # The network re-rates only around what changed (issue 15); the rates must equal a max-min
    # recompute over every flow in flight, whatever the traffic: bursts from one source (a
    # prefill batch), many sources into one sink, finishes and cancels at random times.
    rng = random.Random(7)
    n = 24
    for trial in range(12):
        egress, ingress = _random_endpoints(rng, n)
        net = TransferNetwork(egress, ingress)
        now, tid, live = 0.0, 0, set()
        for step in range(300):
            now += rng.expovariate(50.0)
            op = rng.random()
            if op < 0.55 or not live:
                src = rng.randrange(n // 2)
                for _ in range(rng.choice([1, 1, 1, 4, 12])):       # a batch leaves at once
                    dst = rng.randrange(n // 2, n) if rng.random() < 0.8 else rng.randrange(n)
                    if dst == src:
                        continue
                    live.update(net.start(now, tid, src, dst, rng.uniform(1.0, 40.0)))
                    live.add(tid)
                    tid += 1
            elif op < 0.9:
                nxt = net.next_finish_s()
                if nxt is not None:
                    now = max(now, nxt)
                    for done in net.finish_due(now):
                        live.discard(done)
            else:
                victim = rng.choice(sorted(live))
                net.cancel(now, victim)
                live.discard(victim)
            _check_against_a_global_recompute(net, egress, ingress)
        assert net.num_active == sum(net.counts().values())
        while (nxt := net.next_finish_s()) is not None:       # drained, it keeps no active pair:
            now = max(now, nxt)                               # its memory is what was in flight
            net.finish_due(now)
        assert net.num_active == 0 and not net.counts() and not any(net._out) and not any(net._in)


def test_transfers_finish_when_their_bytes_have_moved_at_the_rates_the_network_shows():
    # A reference integrates every transfer's bytes at the rates `rates()` shows between changes:
    # the network must announce the next finish exactly when the first transfer runs out, hand
    # out the transfers whose bytes have moved and no other, and keep none overdue. (The rates
    # are checked against max-min by the test above; this checks the due queue that turns them
    # into finish times: a pair not re-queued after a re-rating finishes late here.)
    rng = random.Random(11)
    n = 12
    for trial in range(25):
        egress, ingress = _random_endpoints(rng, n)
        net = TransferNetwork(egress, ingress)
        now, tid = 0.0, 0
        left: dict[int, float] = {}             # transfer id -> bytes still to move (reference)
        size: dict[int, float] = {}
        pair: dict[int, tuple[int, int]] = {}
        rates: dict[tuple[int, int], float] = {}

        def rate(i: int) -> float:
            if pair[i] in rates:
                return rates[pair[i]]
            assert abs(left[i]) <= tol(i)   # moved already: found by a cancel, handed out next
            return 0.0

        def advance(t: float) -> None:
            for i in left:
                left[i] -= rate(i) * (t - now)

        def tol(i: int) -> float:
            return 1e-6 * size[i] + 1e-5

        def handed_out(done: list[int]) -> None:
            for i in done:
                assert abs(left.pop(i)) <= tol(i), (trial, i)
            assert all(b > tol(i) for i, b in left.items()), trial     # none overdue

        for step in range(250):
            nxt = net.next_finish_s()
            if left:
                first = now + min(max(b, 0.0) / r if (r := rate(i)) > 0.0 else 0.0 for i, b in left.items())
                assert nxt is not None and math.isclose(nxt, first, rel_tol=1e-7, abs_tol=1e-9), (trial, step)
            else:
                assert nxt is None
            op = rng.random()
            if op < 0.5 or not left:
                t = now + rng.expovariate(40.0)
                t = t if nxt is None else min(t, nxt)
                advance(t)
                now = t
                src = rng.randrange(n)
                for _ in range(rng.choice([1, 1, 3, 8])):               # a batch leaves at once
                    dst = rng.randrange(n)
                    if dst == src:
                        continue
                    nbytes = rng.uniform(1.0, 40.0)
                    done = net.start(now, tid, src, dst, nbytes)
                    left[tid], size[tid], pair[tid] = nbytes, nbytes, (src, dst)
                    handed_out(done)
                    tid += 1
            elif op < 0.9:
                assert nxt is not None
                advance(nxt)
                now = nxt
                handed_out(net.finish_due(now))
            else:
                victim = rng.choice(sorted(left))
                net.cancel(now, victim)
                del left[victim]
            rates = net.rates()

"""The prefill policy on its own (engine/scheduler.py is pure Python): which chunks a step packs together,
and that packing never breaks admission in arrival order."""
from deltarun.cache.state import SeqState
from deltarun.engine.scheduler import Memory, Scheduler
from deltarun.engine.sequence import Request, Sequence
from deltarun.sampling import SamplingParams


class Pool:
    def __init__(self, n: int):
        self.free_slots, self.num_slots = list(range(n)), n

    def release(self, slot: int) -> None:
        self.free_slots.append(slot)

    def slot_nbytes(self) -> int:
        return 0


def scheduler(budget: int = 64, slots: int = 8) -> Scheduler:
    pool = Pool(slots)

    def start(seq: Sequence) -> None:
        seq.state = SeqState(pool.free_slots.pop(0), [])
    return Scheduler(pool, Memory(1 << 40, 1, 1), max_prefill_tokens=budget, block=64, lookahead=1,
                     eos_token_ids=[], start=start, stats={"preemptions": 0})


def add(s: Scheduler, rid: str, n: int, adapter: str | None = None) -> Sequence:
    params = SamplingParams(max_tokens=4).with_defaults({})
    req = Request(rid, list(range(n)), params, 1 << 20, s.next_arrival(), adapter=adapter)
    req.seqs = [Sequence(0, req, None)]  # type: ignore[arg-type]  # the scheduler never samples
    s.add(req)
    return req.seqs[0]


def step(s: Scheduler) -> list[tuple[str, int, int]]:
    """One step's prefill, as the engine runs it: [(request, start, end)] of the chunks it packed."""
    chunks = s.schedule_prefill()
    for c in chunks:
        c.seq.num_computed = c.end
        if c.last:
            s.prefilled(c.seq)
    return [(c.seq.request.request_id, c.start, c.end) for c in chunks]


def test_a_step_packs_waiting_prompts_up_to_the_token_budget():
    s = scheduler(budget=64)
    for rid, n in (("a", 20), ("b", 9), ("c", 30), ("d", 15)):
        add(s, rid, n)
    assert step(s) == [("a", 0, 20), ("b", 0, 9), ("c", 0, 30), ("d", 0, 5)]
    assert step(s) == [("d", 5, 15)]
    assert step(s) == []


def test_packing_admits_in_arrival_order():
    """A request that cannot share the pack (another adapter) is not overtaken by later ones."""
    s = scheduler(budget=64)
    add(s, "first", 60)
    other = add(s, "lora", 10, adapter="x")
    late = add(s, "late", 10)
    assert step(s) == [("first", 0, 60)]  # "late" could take the 4 tokens left, but "lora" came first
    assert late.state is None and other.state is None
    assert step(s) == [("lora", 0, 10)]  # "late" cannot join an adapter's pack
    assert step(s) == [("late", 0, 10)]

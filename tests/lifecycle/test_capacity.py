"""The placement and eviction policy, without processes: snapshot in, plan out."""

from __future__ import annotations

from lifecycle.capacity import Ask, Evict, Gpu, Holder, Place, Wait, never_fits, plan

GB = 1 << 30
ONE = [Gpu(0, 80 * GB)]
TWO = [Gpu(0, 80 * GB), Gpu(1, 80 * GB)]


def holder(name: str, gpus: tuple[int, ...], share: float, *, idle: bool = True, used: float = 0.0,
           sleeps: bool = False) -> Holder:  # fmt: skip
    return Holder(name, holds=True, gpus=gpus, share=share, evictable=idle, last_used=used, sleeps=sleeps)


def test_a_model_that_fits_is_placed_without_evicting_anything() -> None:
    assert plan(Ask("c", 0.45, (0,)), [holder("a", (0,), 0.45)], ONE) == Place((0,))


def test_the_least_recently_used_idle_engine_is_evicted_and_only_it() -> None:
    holders = [holder("a", (0,), 0.45, used=20.0), holder("b", (0,), 0.45, used=10.0)]
    assert plan(Ask("c", 0.45, (0,)), holders, ONE) == Evict((0,), (("b", "stop"),))


def test_an_engine_that_sleeps_on_idle_is_evicted_by_sleeping_it() -> None:
    holders = [holder("a", (0,), 0.45, used=1.0, sleeps=True), holder("b", (0,), 0.45, used=2.0)]
    assert plan(Ask("c", 0.45, (0,)), holders, ONE) == Evict((0,), (("a", "sleep"),))


def test_busy_and_pinned_engines_are_never_evicted() -> None:
    holders = [holder("a", (0,), 0.45, idle=False, used=1.0), holder("b", (0,), 0.45, idle=False, used=2.0)]
    assert plan(Ask("c", 0.45, (0,)), holders, ONE) == Wait(("a", "b"))


def test_enough_victims_are_taken_to_make_room_for_a_large_model() -> None:
    holders = [
        holder("a", (0,), 0.3, used=3.0),
        holder("b", (0,), 0.3, used=1.0),
        holder("c", (0,), 0.3, used=2.0),
    ]
    assert plan(Ask("big", 0.6, (0,)), holders, ONE) == Evict((0,), (("b", "stop"), ("c", "stop")))


def test_a_model_without_gpu_id_packs_onto_the_fullest_gpu_it_fits() -> None:
    holders = [holder("a", (1,), 0.5)]
    assert plan(Ask("c", 0.4, ()), holders, TWO) == Place((1,))
    assert plan(Ask("c", 0.6, ()), holders, TWO) == Place((0,))


def test_a_model_without_gpu_id_evicts_on_the_gpu_needing_fewest_victims() -> None:
    holders = [
        holder("a", (0,), 0.5, used=1.0),
        holder("b", (0,), 0.5, used=2.0),
        holder("c", (1,), 1.0, used=3.0),
    ]
    assert plan(Ask("d", 0.9, ()), holders, TWO) == Evict((1,), (("c", "stop"),))


def test_a_tensor_parallel_model_needs_room_on_every_gpu_of_its_list() -> None:
    holders = [holder("a", (1,), 0.6, used=1.0)]
    assert plan(Ask("tp", 0.5, (0, 1)), holders, TWO) == Evict((0, 1), (("a", "stop"),))
    # and it holds both: a model for GPU 0 must make room from it
    tp = [holder("tp", (0, 1), 0.5, used=1.0)]
    assert plan(Ask("x", 0.6, (0,)), tp, TWO) == Evict((0,), (("tp", "stop"),))


def test_the_loaded_models_limit_evicts_even_when_memory_is_free() -> None:
    holders = [holder("a", (0,), 0.1, used=1.0)]
    assert plan(Ask("b", 0.1, (1,)), holders, TWO, max_loaded=1) == Evict((1,), (("a", "stop"),))
    assert plan(Ask("b", 0.1, ()), [], [], max_loaded=1) == Place(())
    busy = [holder("a", (), 1.0, idle=False)]
    assert plan(Ask("b", 1.0, ()), busy, [], max_loaded=1) == Wait(("a",))


def test_a_cap_on_a_gpu_lowers_its_budget() -> None:
    capped = [Gpu(0, 80 * GB, budget=0.5)]
    assert isinstance(plan(Ask("a", 0.6, (0,)), [], capped), Wait)
    assert plan(Ask("a", 0.5, (0,)), [], capped) == Place((0,))


def test_three_thirds_fill_a_card() -> None:
    holders = [holder("a", (0,), 1 / 3), holder("b", (0,), 1 / 3)]
    assert plan(Ask("c", 1 / 3, (0,)), holders, ONE) == Place((0,))


def test_models_that_can_never_fit_are_named() -> None:
    assert never_fits("a", 0.5, (2,), [], TWO) == "gpu_id: GPU 2 is not present (GPUs: 0, 1)"
    why = never_fits("a", 0.6, (0,), [("p", 0.5, (0,))], ONE)
    assert why == "gpu_memory: 0.6 with the pinned model(s) 'p' (0.5) is over GPU 0's budget of 1"
    assert never_fits("a", 0.6, (), [("p", 0.5, (0,))], TWO) is None  # GPU 1 has room
    assert never_fits("a", 0.5, (0,), [("p", 0.5, (0,))], ONE) is None
    assert never_fits("a", 0.5, (7,), [], []) is None  # no GPU known: nothing to check


def test_only_engines_on_a_gpu_that_lacks_room_are_evicted() -> None:
    """A tensor-parallel model short on GPU 1 only: the idle engine on GPU 0 stays."""
    holders = [holder("b", (0,), 0.45, used=1.0), holder("big", (1,), 0.95, used=2.0)]
    assert plan(Ask("tp", 0.1, (0, 1)), holders, TWO) == Evict((0, 1), (("big", "stop"),))


def replica(
    name: str, gpus: tuple[int, ...], share: float, *, idle: bool = False, used: float = 0.0
) -> Holder:
    return Holder(name, holds=True, gpus=gpus, share=share, evictable=idle, last_used=used, sleeps=False,
                  model="m")  # fmt: skip


def test_replicas_from_a_pool_spread_over_its_gpus_before_packing() -> None:
    # Pack alone would put the second half-card replica beside the first (the fullest GPU).
    first = plan(Ask("m", 0.5, (0, 1), count=1, model="m"), [], TWO)
    assert first == Place((0,))
    second = plan(Ask("m#1", 0.5, (0, 1), count=1, model="m"), [replica("m", (0,), 0.5)], TWO)
    assert second == Place((1,))
    # A third goes where it fits, beside a sibling: spreading is a preference, not a limit.
    both = [replica("m", (0,), 0.5), replica("m#1", (1,), 0.5)]
    third = plan(Ask("m#2", 0.5, (0, 1), count=1, model="m"), both, TWO)
    assert third == Place((0,))


def test_a_tensor_parallel_replica_takes_that_many_gpus_of_its_pool() -> None:
    four = [Gpu(i, 80 * GB) for i in range(4)]
    first = plan(Ask("m", 1.0, (), count=2, model="m"), [], four)
    assert first == Place((0, 1))
    second = plan(Ask("m#1", 1.0, (), count=2, model="m"), [replica("m", (0, 1), 1.0)], four)
    assert second == Place((2, 3))
    both = [replica("m", (0, 1), 1.0), replica("m#1", (2, 3), 1.0)]
    third = plan(Ask("m#2", 1.0, (), count=2, model="m"), both, four)
    assert third == Wait(("m", "m#1"))


def test_a_replica_never_evicts_its_own_model_to_make_room() -> None:
    idle_sibling = replica("m", (0,), 0.6, idle=True)
    other = Holder("x", holds=True, gpus=(1,), share=0.6, evictable=True, last_used=5.0, sleeps=False)
    decision = plan(Ask("m#1", 0.6, (0, 1), count=1, model="m"), [idle_sibling, other], TWO)
    assert decision == Evict((1,), (("x", "stop"),))
    alone = plan(Ask("m#1", 0.6, (0,), count=1, model="m"), [idle_sibling], TWO)
    assert isinstance(alone, Wait)

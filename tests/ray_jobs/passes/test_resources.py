"""Placing a VLM pass's actors on paper before it starts: it runs where it can, and fails fast, naming the shortfall,
where Ray would otherwise wait forever (no Ray here; tests/ray_jobs/test_analyze.py runs the real clusters)."""

from __future__ import annotations

import pytest

from ray_jobs.passes.resources import (
    PassShape,
    ResourceShortfall,
    check_pass_resources,
    choose_cpus_per_actor,
)

ONE_BY_ONE = {"CPU": 1.0, "GPU": 1.0}


def test_an_actor_that_takes_a_nodes_only_cpu_leaves_nothing_for_decoding():
    with pytest.raises(ResourceShortfall) as err:
        check_pass_resources([ONE_BY_ONE], PassShape(1, 1.0, 1.0, filter_actor=False))
    message = str(err.value)
    assert "leaving none for reading, decoding and writing" in message
    assert "Alive: 1 node(s), 1 CPU, 1 GPU; needed: 2 CPU" in message and "vlm_cpus_per_actor=0" in message
    check_pass_resources([ONE_BY_ONE, ONE_BY_ONE], PassShape(1, 1.0, 1.0, filter_actor=False))  # the other node's CPU
    check_pass_resources([ONE_BY_ONE], PassShape(1, 0.0, 1.0, filter_actor=False))  # sharing the CPU


def test_unset_the_actors_share_cpus_only_where_the_cluster_is_short():
    assert choose_cpus_per_actor([{"CPU": 4.0}], PassShape(1, 1.0, 0.0, False), None) == (1.0, None)
    cpus, note = choose_cpus_per_actor([ONE_BY_ONE], PassShape(1, 1.0, 1.0, False), None)
    assert cpus == 0.0 and "share their nodes' CPUs" in note
    assert choose_cpus_per_actor([{"CPU": 4.0}], PassShape(1, 1.0, 0.0, False), 2.0) == (2.0, None)
    with pytest.raises(ResourceShortfall):  # an explicit setting is checked, never changed
        choose_cpus_per_actor([ONE_BY_ONE], PassShape(1, 1.0, 1.0, False), 1.0)


def test_a_resumed_pass_also_needs_a_cpu_for_ray_datas_checkpoint_filter():
    nodes = [{"CPU": 2.0}]
    check_pass_resources(nodes, PassShape(1, 1.0, 0.0, filter_actor=False))
    with pytest.raises(ResourceShortfall, match="1 CPU for the checkpoint filter of a resumed pass"):
        check_pass_resources(nodes, PassShape(1, 1.0, 0.0, filter_actor=True))
    assert choose_cpus_per_actor(nodes, PassShape(1, 1.0, 0.0, True), None)[0] == 0.0
    with pytest.raises(ResourceShortfall, match="needed: 2 CPU"):  # even sharing: filter + tasks on one CPU
        choose_cpus_per_actor([ONE_BY_ONE], PassShape(1, 1.0, 1.0, True), None)


def test_actors_are_placed_per_node_not_against_cluster_totals():
    two_half_nodes = [{"CPU": 8.0, "GPU": 0.5}, {"CPU": 8.0, "GPU": 0.5}]
    with pytest.raises(ResourceShortfall, match="no alive node has 1 CPU and 1 GPU free"):
        check_pass_resources(two_half_nodes, PassShape(1, 1.0, 1.0, filter_actor=False))
    check_pass_resources([{"CPU": 2.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 0.0}], PassShape(2, 1.0, 1.0, False))
    with pytest.raises(ResourceShortfall, match="3 model actor"):
        check_pass_resources([{"CPU": 8.0, "GPU": 2.0}], PassShape(3, 1.0, 1.0, False))

"""Whether a cluster can run a model pass (a VLM pass, the evaluation pass) at all, decided from its alive nodes before
the pass starts. The placement is plain Python (no Ray); `model_actor_resources` reads the alive nodes from Ray.

A Ray Data pass whose model actors take every CPU of the nodes they fit on leaves none for the read, decode and
write tasks: Ray then waits for resources forever, with no error. So the pass places its actors on paper first and
fails fast, naming the shortfall, when nothing would be left for those tasks. Left unset, `vlm_cpus_per_actor` is
1 where the cluster has the CPUs to spare and 0 (the actors share their nodes' CPUs) where it has not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TASK_CPUS = 1.0  # Ray Data's read, decode and write tasks each take one CPU; one at a time is enough to progress


class ResourceShortfall(ValueError):
    """The cluster cannot run the pass as configured; the message names what is missing and how to fix it."""


@dataclass(frozen=True)
class PassShape:
    actors: int  # model actors (vlm_concurrency)
    cpus_per_actor: float
    gpus_per_actor: float
    filter_actor: bool  # a resumed pass runs Ray Data's checkpoint filter, one more actor holding one CPU
    kind: str = "vlm"  # whose settings size it: vlm_* (VLM passes) or eval_* (the evaluation pass)

    @property
    def name(self) -> str:
        return {"vlm": "VLM pass", "eval": "evaluation pass"}[self.kind]


def choose_cpus_per_actor(
    nodes: list[dict[str, float]], shape: PassShape, setting: float | None
) -> tuple[float, str | None]:
    """The CPUs each model actor reserves, and a note for the user when the cluster made that 0 instead of 1.
    Raises ResourceShortfall when even that cannot run."""
    if setting is not None:
        check_pass_resources(nodes, replace(shape, cpus_per_actor=setting))
        return setting, None
    try:
        check_pass_resources(nodes, replace(shape, cpus_per_actor=1.0))
        return 1.0, None
    except ResourceShortfall:
        check_pass_resources(nodes, replace(shape, cpus_per_actor=0.0))
    return 0.0, ("the cluster has no CPU to spare for the model actors; they share their nodes' CPUs with the "
                 f"decode tasks ({shape.kind}_cpus_per_actor=0)")  # fmt: skip


def check_pass_resources(nodes: list[dict[str, float]], shape: PassShape) -> None:
    """Raise ResourceShortfall unless every model actor fits on some node and a CPU is left for the tasks.

    `nodes` holds each alive node's total resources (Ray's `node["Resources"]`), e.g. {"CPU": 1, "GPU": 1}."""
    free = [{"CPU": n.get("CPU", 0.0), "GPU": n.get("GPU", 0.0)} for n in nodes]
    needs = [(shape.cpus_per_actor, shape.gpus_per_actor)] * shape.actors
    if shape.filter_actor:
        needs.append((1.0, 0.0))
    for cpus, gpus in sorted(needs, key=lambda need: (-need[1], -need[0])):  # the hardest to place first
        node = next((n for n in free if n["CPU"] >= cpus and n["GPU"] >= gpus), None)
        if node is None:
            raise ResourceShortfall(_message(nodes, shape, f"no alive node has {cpus:g} CPU and {gpus:g} GPU free "
                                                           "for another actor"))  # fmt: skip
        node["CPU"] -= cpus
        node["GPU"] -= gpus
    if not any(n["CPU"] >= TASK_CPUS for n in free):
        raise ResourceShortfall(_message(nodes, shape, "the actors would hold every CPU, leaving none for reading, "
                                                       "decoding and writing"))  # fmt: skip


def _message(nodes: list[dict[str, float]], shape: PassShape, reason: str) -> str:
    cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    need_cpus = shape.actors * shape.cpus_per_actor + TASK_CPUS + (1 if shape.filter_actor else 0)
    parts = [f"{shape.actors} model actor(s) × {shape.cpus_per_actor:g} CPU ({shape.kind}_cpus_per_actor)"]
    if shape.filter_actor:
        parts.append("1 CPU for the checkpoint filter of a resumed pass")
    parts.append(f"{TASK_CPUS:g} CPU for reading, decoding and writing")
    return (
        f"the {shape.name} cannot run on this cluster: {reason}. Alive: {len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU; "
        f"needed: {need_cpus:g} CPU ({' + '.join(parts)}) and {shape.actors * shape.gpus_per_actor:g} GPU. "
        f"Add a node or lower {shape.kind}_concurrency"
        + ("" if shape.cpus_per_actor == 0 else f", or --set {shape.kind}_cpus_per_actor=0 to let the actors share "
           "their CPUs")
    )


def model_actor_resources(kind: str, concurrency: int, gpus_per_actor: float, cpus_per_actor: float | None,
                          resuming: bool) -> tuple[float, float]:  # fmt: skip
    """(GPUs, CPUs) each of a pass's model actors reserves on the running Ray cluster: GPUs only where it has any,
    CPUs as `choose_cpus_per_actor` decides from its alive nodes (a note says when that is 0)."""
    import sys

    import ray

    gpus = gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    cpus, note = choose_cpus_per_actor(alive, PassShape(concurrency, 1.0, gpus, resuming, kind), cpus_per_actor)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return gpus, cpus

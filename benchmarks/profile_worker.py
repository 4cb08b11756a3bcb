"""Where a run's time goes: cProfile of the worker task, in-process, on the benchmark services.

``python -m benchmarks.profile_worker`` profiles, after warm-up runs of each: a 40-phase
run of near-zero-work nodes, a 40-phase run passing ~122 KB from phase to phase, and 20
enqueues of a 40-phase workflow. It prints self time by package and the cumulative time
of the project's functions. psycopg's share includes waiting for the server.
"""

from __future__ import annotations

import collections
import cProfile
import io
import pstats
from collections.abc import Callable

from benchmarks import bench_worker as bw
from benchmarks.harness import services


def by_package(stats: pstats.Stats) -> tuple[float, collections.Counter[str]]:
    shares: collections.Counter[str] = collections.Counter()
    for (path, _line, _fn), (_cc, _nc, self_time, _ct, _callers) in stats.stats.items():
        if "site-packages/" in path:
            key = path.split("site-packages/")[1].split("/")[0]
        elif "/flowbuilder/" in path:
            key = "flowbuilder/" + path.split("/flowbuilder/")[1]
        elif path.startswith(("~", "<")):
            key = "builtins"
        else:
            key = "stdlib:" + path.rsplit("/", 1)[-1]
        shares[key] += self_time
    return sum(shares.values()), shares


def report(title: str, fn: Callable[[], object], pattern: str) -> None:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    total, shares = by_package(pstats.Stats(profile))
    print(f"== {title}: {total * 1000:.0f} ms (self time, profiled)")
    for key, value in shares.most_common(12):
        print(f"  {value / total:6.1%}  {key}")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(pattern, 25)
    lines = out.getvalue().splitlines()
    print("\n".join(x for x in lines if "/" in x or "ncalls" in x))


def main() -> None:
    from flowbuilder.platform.logging import setup_logging
    from flowbuilder.tasks import execute_workflow

    setup_logging("WARNING", force=True)
    with (
        services() as svc,
        bw.session(svc, project_worker=False, bare_worker=False, warm=False) as (project, _, _),
    ):
        workloads = (
            ("json40", "40 phases, near-zero work", bw.json_definition(40)),
            (
                "big40",
                "40 phases, ~122 KB outputs",
                bw.delays_definition(40, 0, bw.payload_of(122_000)),
            ),
        )
        for name, title, definition in workloads:
            wf = project.workflow(name, definition)

            def one_run(wf=wf) -> None:
                ex, _ = project.enqueue(wf)
                execute_workflow.apply(args=[str(ex)]).get()

            for _ in range(6):
                one_run()
            ex, _ = project.enqueue(wf)
            report(title, lambda ex=ex: execute_workflow.apply(args=[str(ex)]).get(), "flowbuilder")
        wf = project.workflow("json40", bw.json_definition(40))  # created above
        for _ in range(5):
            project.enqueue(wf)
        report(
            "20 enqueues of 40 phases",
            lambda: [project.enqueue(wf) for _ in range(20)],
            "flowbuilder|kombu/messaging|botocore/endpoint",
        )


if __name__ == "__main__":
    main()
